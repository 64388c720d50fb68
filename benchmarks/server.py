"""Latency and throughput of the HLIP MONAI Label server (issue 6), tiny and ViT-B, on CPU.

For each configuration an untrained checkpoint is written to a temporary folder and a real
``monailabel start_server`` (python -m monailabel.main) serves a studies folder on 127.0.0.1. A study
is two DICOM series: the real T1w brain series (every 2nd slice: of the full 384 with HLIP_SHARED_DATA set,
of the 48-slice excerpt in tests/data otherwise; slices of
384x274) and a synthetic 48-slice 192x192 series.

- first request on a new study: a study the server knows (its folder was scanned at start-up) but
  never loaded: loading, preprocessing, embedding, one relevance pass per finding (a server with
  the background cache off, so nothing was loaded ahead); JSON only;
- direct hlip_core call: ``StudyPredictor.predict(files, findings)`` on a new study in this process,
  same threads, in turns with the server's requests (alternating which goes first, after one warm-up
  of each). The server's overhead is its time outside the study's work (the request's latency
  minus the ``compute_ms`` the answer reports: HTTP, routing, queue, JSON) over the direct call's
  time; the ratio of the two medians is printed too, but it carries the run-to-run noise of the
  work itself on shared CPUs (seconds for ViT-B), which the per-request figure does not;
- first request on a folder copied in after start-up (the request also reads its DICOM headers to
  learn its series), and the first request with heat maps (answer size too);
- repeated request on a cached study (same findings: answered from memory), and new findings on
  a cached study (the preprocessed study is in memory; the model runs);
- /info/ latency, measured from another process, while an inference with heat maps runs;
- load: 8 clients, 200 requests (findings already answered, text search, /info/, similar);
- seconds the background cache spends per study;
- with the tiny model, the Slicer module's upload-ask-heat-maps round trip against the same server
  (``measure()`` of benchmarks/slicer_client.py, the Slicer helper's benchmark), so both figures
  come from one command.

    python benchmarks/server.py                   # tiny and ViT-B
    python benchmarks/server.py --configs tiny --threads 1 --slicer-repeats 0
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from realdata import benchmark_mri_dicom_dir  # noqa: E402
from server_helpers import free_port, make_checkpoint, stop_process, wait_for, write_dicom_series  # noqa: E402

CONFIGS = {
    "tiny": ("tiny_multiscan_h2", (32, 64, 64), {"new": 9, "findings": 2}),
    "vitb": ("vit_base_multiscan_h2_token1176", (48, 224, 224), {"new": 3, "findings": 1}),
}
TEXTS = ["midline shift", "intracranial hemorrhage", "normal brain", "acute infarct", "white matter lesions"]


def make_study(base: Path) -> list[Path]:
    """The two series once; new studies are hard links to them (new folder = new study for the server)."""
    import numpy as np
    import pydicom

    real = sorted(benchmark_mri_dicom_dir().rglob("*.dcm"))
    keyed = []
    for f in real:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, float)
        keyed.append((float(np.dot(np.cross(iop[:3], iop[3:]), np.array(ds.ImagePositionPatient, float))), f))
    files = [f for _, f in sorted(keyed)[::2]]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    (base / "t1").mkdir(parents=True)
    out = []
    for f in files:
        shutil.copy(f, base / "t1" / f.name)
        out.append(base / "t1" / f.name)
    out += write_dicom_series(base / "flair", study_uid, n_slices=48, rows=192, cols=192, description="FLAIR synthetic", series_number=2)
    return out


def new_study(base: Path, files: list[Path], root: Path, name: str) -> list[Path]:
    out = []
    for f in files:
        target = root / name / f.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(f, target)
        out.append(target)
    return out


def median_ms(values) -> float:
    return 1000 * statistics.median(values)


PROBE = """
import sys, time, requests
url, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.monotonic() + seconds
with requests.Session() as s:
    while time.monotonic() < end:
        t = time.perf_counter(); s.get(url, timeout=30); out.append(time.perf_counter() - t); time.sleep(0.02)
print(max(out) * 1000, sorted(out)[len(out) // 2] * 1000, len(out))
"""


@contextlib.contextmanager
def server(studies: Path, checkpoint: Path, cache: Path, threads: int, tmp: Path, index: bool):
    import subprocess

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"server-{port}.log"
    args = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"), "--studies", str(studies),
            "--conf", "checkpoint", str(checkpoint), "--conf", "cache_dir", str(cache), "--conf", "threads", str(threads),
            "--conf", "rescan_seconds", "3600", "--conf", "index", str(index).lower(),
            "--uvicorn_app", "monailabel_app.asgi:app", "--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, HOME=str(tmp / "home"), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        wait_for(f"{url}/info/", 900, proc, log)
        yield url, time.perf_counter() - start
    finally:
        stop_process(proc)


def idle(url: str, index: bool = True) -> dict:
    """Wait until the datastore is scanned, the worker idle and (with the cache on) every study embedded."""
    while True:
        s = requests.get(f"{url}/hlip/status", timeout=60).json()
        embedded = not index or (s["index"]["pending"] == 0 and s["index"]["embedding"] is None)
        if s["datastore"].get("scanned") and not s["worker"]["busy"] and not s["worker"]["waiting"] and embedded:
            return s
        time.sleep(0.2)


def post(url: str, study: str, body: dict):
    start = time.perf_counter()
    r = requests.post(f"{url}/infer/hlip_findings", params={"image": study}, json=body, timeout=7200)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start, r


def run(name: str, threads: int, tmp: Path, slicer_repeats: int = 0) -> dict:
    import subprocess

    import torch

    from hlip_core.inference import StudyPredictor

    config, shape, plan = CONFIGS[name]
    findings = TEXTS[: plan["findings"]]
    out = {"config": config, "threads": threads, "findings_per_request": len(findings)}
    checkpoint = make_checkpoint(tmp / f"ckpt-{name}", config=config, target_shape=shape)
    base = tmp / f"base-{name}"
    base.mkdir()
    files = make_study(base)

    # 1. the same work directly and through the server, in turns: a study the server knows (scanned
    #    at start-up) but never loaded, and a fresh copy of it for the direct call
    torch.set_num_threads(threads)
    predictor = StudyPredictor.load(checkpoint)
    cold = tmp / f"cold-{name}"
    for i in range(plan["new"] + 1):
        new_study(base, files, cold, f"new{i}")
    direct, served, outside = [], [], []
    with server(cold, checkpoint, tmp / f"cache-cold-{name}", threads, tmp, index=False) as (url, startup):
        out["startup_s"] = startup
        idle(url, index=False)
        post(url, f"new{plan['new']}", {"findings": findings})  # warm-up: first use of the text tower, allocator
        predictor.predict([str(p) for p in new_study(base, files, tmp / f"direct-{name}", "warm")], findings)
        for i in range(plan["new"]):
            study_files = [str(p) for p in new_study(base, files, tmp / f"direct-{name}", f"d{i}")]

            def direct_call():
                start = time.perf_counter()
                predictor.predict(study_files, findings, heatmaps=False)
                direct.append(time.perf_counter() - start)

            def server_call(i=i):
                seconds, r = post(url, f"new{i}", {"findings": findings})
                served.append(seconds)
                outside.append(seconds - r.json()["compute_ms"] / 1000)  # HTTP, routing, queue, JSON: all but the work itself

            for call in ((direct_call, server_call) if i % 2 == 0 else (server_call, direct_call)):  # alternate who goes first
                call()
    del predictor
    out["direct_new_study_ms"], out["server_new_study_ms"] = median_ms(direct), median_ms(served)
    out["direct_runs_ms"], out["server_runs_ms"] = [round(1000 * x) for x in direct], [round(1000 * x) for x in served]
    out["direct_ratio_pct"] = 100 * (out["server_new_study_ms"] - out["direct_new_study_ms"]) / out["direct_new_study_ms"]
    out["outside_compute_ms"] = median_ms(outside)
    out["overhead_pct"] = 100 * out["outside_compute_ms"] / out["direct_new_study_ms"]

    # 2. a server that keeps its embedding cache: everything else
    studies = tmp / f"studies-{name}"
    for i in range(3):
        new_study(base, files, studies, f"seed{i}")
    with server(studies, checkpoint, tmp / f"cache-{name}", threads, tmp, index=True) as (url, _):
        status = idle(url)
        out["embedding_s_per_study"] = status["index"]["seconds_per_study"]

        unseen, heat, heat_mb = [], [], []
        for i in range(max(1, plan["new"] // 2)):
            new_study(base, files, studies, f"unseen{i}")  # copied in after start-up: the request finds it
            unseen.append(post(url, f"unseen{i}", {"findings": findings})[0])
            idle(url)
            new_study(base, files, studies, f"heat{i}")
            seconds, r = post(url, f"heat{i}", {"findings": findings, "heatmaps": True})
            heat.append(seconds)
            heat_mb.append(len(r.content) / 2**20)
            idle(url)
        out["server_unseen_folder_ms"] = median_ms(unseen)
        out["server_new_study_heatmaps_ms"] = median_ms(heat)
        out["heatmap_response_mb"] = statistics.median(heat_mb)

        repeated = [post(url, "seed0", {"findings": findings})[0] for _ in range(21)][1:]
        out["cached_repeat_ms"] = median_ms(repeated)
        out["cached_repeat_p95_ms"] = 1000 * sorted(repeated)[int(0.95 * len(repeated)) - 1]
        fresh = [post(url, "seed1", {"findings": [f"{TEXTS[i % 5]} number {i}" for _ in range(len(findings))]})[0] for i in range(3)]
        out["cached_study_new_findings_ms"] = median_ms(fresh)

        # /info/ from another process while a long inference with heat maps runs
        job = threading.Thread(target=post, args=(url, "seed2", {"findings": [f"slow finding {i}" for i in range(4 * len(findings))], "heatmaps": True}))
        job.start()
        seconds = max(5.0, 3 * out["server_new_study_heatmaps_ms"] / 1000)
        probe = subprocess.run([sys.executable, "-c", PROBE, f"{url}/info/", str(seconds)], capture_output=True, text=True, check=True)
        job.join()
        worst, median, n = (float(x) for x in probe.stdout.split())
        out["info_during_inference_max_ms"], out["info_during_inference_median_ms"] = worst, median

        # load: 8 clients, 200 requests
        for study in ("seed0", "seed1", "seed2"):
            post(url, study, {"findings": findings})
        idle(url)

        def one(i: int) -> int:
            kind, study = i % 4, f"seed{i % 3}"
            if kind == 0:
                r = requests.post(f"{url}/infer/hlip_findings", params={"image": study}, json={"findings": findings}, timeout=600)
            elif kind == 1:
                r = requests.get(f"{url}/hlip/search", params={"text": TEXTS[i % 5], "k": 5}, timeout=600)
            elif kind == 2:
                r = requests.get(f"{url}/info/", timeout=600)
            else:
                r = requests.get(f"{url}/hlip/similar", params={"study": study}, timeout=600)
            return r.status_code

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(16)))
            start = time.perf_counter()
            codes = list(pool.map(one, range(200)))
            elapsed = time.perf_counter() - start
        out["load_rps"] = 200 / elapsed
        out["load_failures"] = sum(c != 200 for c in codes)

        if slicer_repeats:  # the Slicer module's round trip against this same server (benchmarks/slicer_client.py)
            import slicer_client

            volumes = slicer_client.make_study(tmp / f"slicer-{name}", 4, (48, 192, 192))
            out["slicer_client"] = slicer_client.measure(url, volumes, slicer_client.FINDINGS, slicer_repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,vitb", help="comma-separated, of: tiny, vitb (default: tiny,vitb)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in the server and for the direct call (default: 1)")
    parser.add_argument("--slicer-repeats", type=int, default=3,
                        help="timed round trips per way of the Slicer client benchmark, run against the tiny server; 0: skip (default: 3)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hlip-server-bench-") as tmp:
        for name in args.configs.split(","):
            print(f"-- {name} ...", flush=True)
            rows.append(run(name, args.threads, Path(tmp), args.slicer_repeats if name == "tiny" else 0))
            print({k: v for k, v in rows[-1].items() if k != "slicer_client"}, flush=True)
    print(f"\ncommand: python benchmarks/server.py {' '.join(sys.argv[1:])}  ({os.cpu_count()} CPUs)".rstrip())
    keys = [("first request, new study (JSON)", "server_new_study_ms", "ms"), ("direct hlip_core predict, new study", "direct_new_study_ms", "ms"),
            ("server's time outside the study's work, per request", "outside_compute_ms", "ms"),
            ("server overhead = that / direct (bar: < 10%)", "overhead_pct", "%"),
            ("ratio of the medians, server / direct - 1 (carries run-to-run noise)", "direct_ratio_pct", "%"),
            ("first request, folder copied in after start-up", "server_unseen_folder_ms", "ms"),
            ("first request, new study, with heat maps", "server_new_study_heatmaps_ms", "ms"),
            ("heat-map answer size", "heatmap_response_mb", "MB"), ("repeated request, cached study (median; bar tiny: < 100 ms)", "cached_repeat_ms", "ms"),
            ("repeated request, cached study (p95)", "cached_repeat_p95_ms", "ms"), ("new findings, cached study", "cached_study_new_findings_ms", "ms"),
            ("requests/s, 8 clients x 200 requests", "load_rps", "/s"), ("failed requests under load", "load_failures", ""),
            ("/info/ while the model runs (max)", "info_during_inference_max_ms", "ms"), ("/info/ while the model runs (median)", "info_during_inference_median_ms", "ms"),
            ("background embedding per study", "embedding_s_per_study", "s"),
            ("server start-up", "startup_s", "s")]
    print("\n| measure | " + " | ".join(f"{r['config']} ({r['findings_per_request']} finding(s), {r['threads']} thread(s))" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label, key, unit in keys:
        print(f"| {label} | " + " | ".join(f"{r[key]:.1f} {unit}".strip() if isinstance(r[key], float) else f"{r[key]} {unit}".strip() for r in rows) + " |")
    for r in rows:
        print(f"\n{r['config']}: new-study runs, direct {r['direct_runs_ms']} ms, server {r['server_runs_ms']} ms (in turns)")
        if "slicer_client" in r:
            import slicer_client

            print(f"\nSlicer client round trip against the {r['config']} server (benchmarks/slicer_client.py measure()):")
            print(slicer_client.report(r["slicer_client"]))


if __name__ == "__main__":
    main()
