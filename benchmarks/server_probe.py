"""The hostile-client probe of issue 20 as a benchmark, against a real ``monailabel start_server``
(tiny untrained checkpoint, synthetic NIfTI and DICOM studies, 127.0.0.1 only):

- load: N concurrent clients send mixed requests for a fixed time: /info/, cached findings, text
  search, similar, an upload session (PUT, findings on it, DELETE), and hostile ones (unsafe ids,
  JSON nested too deep, a truncated .nii.gz, an unknown route); per kind the count, the failures
  (an answer other than the expected status, or no answer) and p50/p95 latency;
- the gzip bomb (a 4 MB .nii.gz holding a 1024^3 float32 volume): the answer and the server's
  peak RSS (sampled every 20 ms) against its RSS before;
- kill -9 during an upload (the body half sent) and during embedding (a new study copied in, the
  background cache busy with it), each followed by a restart on the same cache: seconds to answer
  /info/ again, whether the findings and the embedding cache work, and what is left in cache/tmp.

    python benchmarks/server_probe.py                       # 16 clients for 60 s (~2-3 min in all)
    python benchmarks/server_probe.py --clients 4 --seconds 10
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from hostile import write_gzip_bomb, write_nifti  # noqa: E402
from server_helpers import free_port, make_checkpoint, stop_process, wait_for, write_dicom_series, write_nifti_study  # noqa: E402

SCAN = (np.arange(24 * 40 * 48, dtype=np.float32).reshape(24, 40, 48) % 173) * 5.0


def start(studies: Path, checkpoint: Path, cache: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"), "--studies", str(studies),
            "--conf", "checkpoint", str(checkpoint), "--conf", "cache_dir", str(cache), "--conf", "threads", "1",
            "--conf", "rescan_seconds", "1", "--uvicorn_app", "monailabel_app.asgi:app", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, HOME=str(tmp / "home"), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "ab") as fh:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(f"{url}/info/", 600, proc, log)
    return proc, url


def status(url: str) -> dict:
    return requests.get(f"{url}/hlip/status", timeout=30).json()


def wait_embedded(url: str, n: int, timeout: float = 300) -> float:
    begin = time.monotonic()
    while True:
        index = status(url)["index"]
        if index["indexed"] >= n and not index["pending"]:
            return time.monotonic() - begin
        if time.monotonic() - begin > timeout:
            raise TimeoutError(f"the embedding cache did not reach {n} studies: {index}")
        time.sleep(0.3)


def rss_mb(proc: subprocess.Popen) -> float:
    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def tmp_entries(cache: Path) -> list[str]:
    folder = cache / "tmp"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def kill9(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


# -- load -------------------------------------------------------------------------------------------


def said(r: requests.Response, step: str = "") -> tuple[int, str]:
    """(status, "<step> <status>: <the answer's detail>") of an answer."""
    try:
        detail = str(r.json().get("detail", ""))
    except ValueError:
        detail = r.text
    return r.status_code, f"{step} {r.status_code}: {detail[:120]}".strip()


def requests_of(url: str, scan: Path, truncated: Path):
    """(kind, expected statuses, callable returning (status, what failed)) for each kind of request."""
    def upload(path: Path) -> requests.Response:
        with open(path, "rb") as f:
            return requests.put(f"{url}/session/", files=[("files", (path.name, f))], timeout=120)

    def session_round():
        r = upload(scan)
        if r.status_code != 200:
            return said(r, "PUT")
        sid = r.json()["session_id"]
        f = requests.post(f"{url}/infer/hlip_findings", params={"session_id": sid}, json={"findings": ["hemorrhage"]}, timeout=300)
        d = requests.delete(f"{url}/session/{sid}", timeout=60)
        if f.status_code == 200 and d.status_code != 200:
            return said(d, "DELETE")
        return said(f, "infer")

    return [
        ("info", {200}, lambda: said(requests.get(f"{url}/info/", timeout=60))),
        ("findings (cached)", {200}, lambda: said(requests.post(f"{url}/infer/hlip_findings", params={"image": "study0"},
                                                                 json={"findings": ["hemorrhage"]}, timeout=300))),
        ("search", {200}, lambda: said(requests.get(f"{url}/hlip/search", params={"text": "midline shift", "k": 3}, timeout=60))),
        ("similar", {200}, lambda: said(requests.get(f"{url}/hlip/similar", params={"study": "study1", "k": 3}, timeout=60))),
        ("upload session + findings + delete", {200, 503}, session_round),
        ("hostile: unsafe id", {400}, lambda: said(requests.get(f"{url}/datastore/image", params={"image": "../../etc/passwd"}, timeout=60))),
        ("hostile: JSON nested 100,000 deep", {400}, lambda: said(requests.post(f"{url}/infer/hlip_findings", params={"image": "study0"},
                                                                                  data="[" * 100_000, headers={"Content-Type": "application/json"},
                                                                                  timeout=60))),
        ("hostile: truncated .nii.gz", {422}, lambda: said(upload(truncated))),
        ("hostile: unknown route", {404, 405}, lambda: said(requests.post(f"{url}/scoring/anything", timeout=60))),
    ]


def load(url: str, clients: int, seconds: float, scan: Path, truncated: Path) -> dict:
    kinds = requests_of(url, scan, truncated)
    times, fails, why = defaultdict(list), defaultdict(int), defaultdict(lambda: defaultdict(int))
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < end:
            name, ok, call = rng.choice(kinds)
            begin = time.perf_counter()
            try:
                status, what = call()
            except requests.RequestException as e:
                status, what = None, f"no answer ({type(e).__name__})"
            with lock:
                times[name].append(time.perf_counter() - begin)
                if status not in ok:
                    fails[name] += 1
                    why[name][what] += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    out = {}
    for name, _, _ in kinds:
        t = sorted(times[name])
        out[name] = {"n": len(t), "failures": fails[name], **({"failed_with": dict(why[name])} if why[name] else {}),
                     "p50_ms": round(1000 * statistics.median(t), 1) if t else None,
                     "p95_ms": round(1000 * t[min(len(t) - 1, int(0.95 * len(t)))], 1) if t else None}
    return out


# -- the bomb and the kills -------------------------------------------------------------------------


def bomb(url: str, proc: subprocess.Popen, path: Path) -> dict:
    before = rss_mb(proc)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_mb(proc))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    begin = time.perf_counter()
    try:
        with open(path, "rb") as f:
            r = requests.put(f"{url}/session/", files=[("files", (path.name, f))], timeout=300)
    finally:
        done.set()
        sampler.join()
    return {"file_mb": round(path.stat().st_size / 2**20, 1), "status": r.status_code, "detail": r.json().get("detail", "")[:160],
            "seconds": round(time.perf_counter() - begin, 2), "rss_before_mb": round(before), "rss_peak_mb": round(max(peak))}


def slow_upload(url: str, size: int, sent: threading.Event) -> None:
    """A multipart upload whose body stops half way (the server is killed meanwhile)."""
    boundary = "probe-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.nii\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body():
        yield head
        for i in range(size // (1 << 20)):
            yield bytes(1 << 20)
            if i == size // (2 << 20):
                sent.set()
                time.sleep(30)  # the server dies here
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        requests.put(f"{url}/session/", data=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    except requests.RequestException:
        pass


def after_restart(proc_url, cache: Path, n_studies: int, killed_at: str, left: list[str]) -> dict:
    proc, url, seconds = proc_url
    findings = requests.post(f"{url}/infer/hlip_findings", params={"image": "study0"}, json={"findings": ["hemorrhage"]}, timeout=300)
    embed_s = wait_embedded(url, n_studies)
    return {"killed": killed_at, "tmp_before_restart": len(left), "restart_to_info_s": round(seconds, 1),
            "findings_after": findings.status_code, "all_embedded_after_s": round(embed_s, 1), "tmp_after_restart": tmp_entries(cache)}


def timed_start(studies, checkpoint, cache, tmp):
    begin = time.perf_counter()
    proc, url = start(studies, checkpoint, cache, tmp)
    return proc, url, time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the load phase (16)")
    parser.add_argument("--seconds", type=float, default=60, help="length of the load phase (60 s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hlip-probe-"))
    results: dict = {"clients": args.clients, "seconds": args.seconds}
    proc = None
    try:
        studies, cache = tmp / "studies", tmp / "cache"
        for i in range(3):
            write_nifti_study(studies / f"study{i}", seed=i)
        write_dicom_series(studies / "dicom0" / "t1", "1.2.826.0.1.20.1", "1.2.826.0.1.20.1.1")
        checkpoint = make_checkpoint(tmp / "ckpt")
        scan = write_nifti(tmp / "scan.nii.gz", SCAN)
        truncated = write_nifti(tmp / "cut.nii.gz", SCAN, keep_bytes=352 + SCAN.nbytes // 2)
        bomb_file = write_gzip_bomb(tmp / "bomb.nii.gz")
        proc, url = start(studies, checkpoint, cache, tmp)
        wait_embedded(url, 4)

        results["load"] = load(url, args.clients, args.seconds, scan, truncated)
        results["tmp_after_load"] = tmp_entries(cache)
        results["bomb"] = bomb(url, proc, bomb_file)
        results["tmp_after_bomb"] = tmp_entries(cache)

        sent = threading.Event()  # kill -9 while an upload is half received
        uploader = threading.Thread(target=slow_upload, args=(url, 64 << 20, sent))
        uploader.start()
        sent.wait(60)
        time.sleep(0.5)
        kill9(proc)
        left = tmp_entries(cache)
        uploader.join()
        restarted = timed_start(studies, checkpoint, cache, tmp)
        proc, url = restarted[0], restarted[1]
        results["kill_during_upload"] = after_restart(restarted, cache, 4, "upload half sent", left)

        for i in range(4):  # kill -9 while the background cache embeds studies copied in
            shutil.copytree(studies / "study0", studies / f"copy{i}")
        deadline = time.monotonic() + 60
        while status(url)["index"]["embedding"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        embedding = status(url)["index"]["embedding"] is not None
        kill9(proc)
        left = tmp_entries(cache)
        restarted = timed_start(studies, checkpoint, cache, tmp)
        proc, url = restarted[0], restarted[1]
        results["kill_during_embedding"] = after_restart(restarted, cache, 8, "while embedding" if embedding else "embedding not seen", left)
    finally:
        if proc is not None and proc.poll() is None:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
