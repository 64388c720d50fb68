"""What SlicerHLIP's client layer adds to a round trip with the HLIP server (issue 7's bar: < 10%).

One round trip = upload a 4-volume study as one session, ask 10 findings with heat maps, receive
the 10 heat maps. It is timed two ways against the same server, alternately:

- bare: the same bytes with ``http.client`` and nothing else (the upload body built in memory
  before the clock starts, the answer read into memory and not parsed): what the server and the
  loopback transfer take by themselves, i.e. the server's own time for the request;
- client: ``SlicerHLIPLib`` as the Slicer module uses it (``study.ask``): the upload streamed from
  the files with progress and cancel checks, the multipart answer parsed as it arrives, each heat
  map written to a file and its NIfTI geometry read.

The server's compute time varies between runs (other processes share the CPUs), so the client
layer's cost is measured per run outside the server's own ``elapsed_ms`` (its findings work):
(client total - its elapsed_ms) - (bare total - its elapsed_ms), medians, and related to the bare
round trip: overhead_pct = that / bare. The direct ratio of the two medians is printed too.

    python benchmarks/slicer_client.py                        # starts a tiny server of its own
    python benchmarks/slicer_client.py --url http://127.0.0.1:8000 --repeats 7

``measure(url, files, findings, repeats)`` is the function to call from another benchmark.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
for folder in (REPO / "tests", REPO / "SlicerHLIP"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from SlicerHLIPLib import HLIPClient, LocalVolume, ask, plan_question  # noqa: E402
from SlicerHLIPLib.multipart import FieldPart, FilePart, MultipartBody, boundary_of, read_multipart  # noqa: E402

FINDINGS = ["intracranial haemorrhage", "midline shift", "mass effect", "acute infarct", "hydrocephalus",
            "white matter lesions", "brain atrophy", "glioma", "meningioma", "brain metastases"]


def make_study(folder: Path, n_scans: int = 4, shape=(48, 192, 192), seed: int = 0) -> list:
    """``n_scans`` int16 NIfTI volumes of a brain-MRI-like size, each with its own geometry."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_scans):
        z = np.linspace(0, 1, shape[0])[:, None, None]
        vol = (rng.random(shape) * 300 + 700 * z).astype(np.int16)
        image = sitk.GetImageFromArray(vol)
        image.SetSpacing((1.0 + 0.1 * k, 1.0, 3.0))
        image.SetOrigin((-96.0 + k, -96.0, -72.0))
        path = folder / f"scan{k}.nii.gz"
        sitk.WriteImage(image, str(path), True)
        paths.append(path)
    return paths


def _bare_connection(url: str) -> tuple:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600), parts.path


def bare_round_trip(url: str, files: list, findings: list) -> dict:
    """The same exchange with http.client only; returns seconds, the server's elapsed_ms, answer bytes."""
    names = [f"scan{i:02d}.nii.gz" for i in range(len(files))]
    upload = MultipartBody([FilePart("files", str(p), n) for p, n in zip(files, names)]
                           + [FieldPart("scans", json.dumps([{"file": n} for n in names]), "application/json")])
    body = b"".join(upload.chunks())  # in memory before the clock starts
    question = json.dumps({"findings": findings, "heatmaps": True}).encode()
    start = time.perf_counter()
    conn, prefix = _bare_connection(url)
    conn.request("PUT", prefix + "/session/", body=body, headers={"Content-Type": upload.content_type})
    response = conn.getresponse()
    session = json.loads(response.read())["session_id"]
    conn.close()
    conn, prefix = _bare_connection(url)
    conn.request("POST", f"{prefix}/infer/hlip_findings?session_id={session}", body=question,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    answer = response.read()
    conn.close()
    seconds = time.perf_counter() - start
    assert response.status == 200, answer[:300]
    parts = {}  # after the clock: the server's own time from the JSON part

    def open_part(headers):
        parts[headers.name] = io.BytesIO()
        return parts[headers.name]

    read_multipart(io.BytesIO(answer).read, boundary_of(response.headers["Content-Type"]), open_part, lambda h, s: None)
    server_ms = float(json.loads(parts["params"].getvalue())["elapsed_ms"])
    return {"seconds": seconds, "server_ms": server_ms, "bytes": len(answer)}


def client_round_trip(url: str, files: list, findings: list, out_dir: Path) -> dict:
    """The Slicer module's path: SlicerHLIPLib's ask() with heat maps written to ``out_dir``."""
    client = HLIPClient(url)
    volumes = [LocalVolume(f"node{i}", f"scan {i}") for i in range(len(files))]
    start = time.perf_counter()
    answer = ask(client, findings, plan_question(volumes), {v.key: str(p) for v, p in zip(volumes, files)},
                 heatmaps=True, out_dir=out_dir, compress=False)
    seconds = time.perf_counter() - start
    assert len(answer.result.heatmaps) == len(findings)
    return {"seconds": seconds, "server_ms": answer.result.server_ms}


def measure(url: str, files: list, findings: list = FINDINGS, repeats: int = 5) -> dict:
    """Bare and client round trips, alternately (after one warm-up of each).

    The server's compute time varies from run to run (other processes share the CPUs), so the
    client layer's cost is taken per run as what is left once the server's own ``elapsed_ms`` is
    subtracted (upload, session, transfer, parsing, files), client minus bare, on the medians;
    ``overhead_pct`` relates it to the bare round trip (the server's own time for the exchange)."""
    bare, client = [], []
    with tempfile.TemporaryDirectory(prefix="hlip-slicer-bench-") as tmp:
        bare_round_trip(url, files, findings)
        client_round_trip(url, files, findings, Path(tmp) / "warm")
        for i in range(repeats):
            pair = [lambda: bare.append(bare_round_trip(url, files, findings)),
                    lambda i=i: client.append(client_round_trip(url, files, findings, Path(tmp) / f"run{i}"))]
            for run in (pair if i % 2 == 0 else pair[::-1]):  # alternate which goes first
                run()
    med = statistics.median
    outside = lambda runs: med(1000 * r["seconds"] - r["server_ms"] for r in runs)  # noqa: E731
    bare_ms, client_ms = med(1000 * r["seconds"] for r in bare), med(1000 * r["seconds"] for r in client)
    added_ms = outside(client) - outside(bare)
    return {"scans": len(files), "findings": len(findings), "repeats": repeats,
            "upload_mb": sum(os.path.getsize(p) for p in files) / 2**20, "answer_mb": med(r["bytes"] for r in bare) / 2**20,
            "bare_ms": bare_ms, "client_ms": client_ms, "direct_ratio_pct": 100 * (client_ms - bare_ms) / bare_ms,
            "server_elapsed_ms_bare": med(r["server_ms"] for r in bare), "server_elapsed_ms_client": med(r["server_ms"] for r in client),
            "outside_server_ms_bare": outside(bare), "outside_server_ms_client": outside(client),
            "client_layer_ms": added_ms, "overhead_pct": 100 * added_ms / bare_ms,
            "bare_runs_ms": [round(1000 * r["seconds"]) for r in bare], "client_runs_ms": [round(1000 * r["seconds"]) for r in client]}


def report(row: dict) -> str:
    return "\n".join([
        f"round trip: upload {row['scans']} volumes ({row['upload_mb']:.1f} MB), ask {row['findings']} findings, "
        f"receive {row['findings']} heat maps ({row['answer_mb']:.1f} MB); medians of {row['repeats']} alternating runs",
        f"  bare http.client exchange (the server's own time + loopback transfer): {row['bare_ms']:.0f} ms  runs {row['bare_runs_ms']}",
        f"  SlicerHLIPLib client round trip:                                       {row['client_ms']:.0f} ms  runs {row['client_runs_ms']}",
        f"  server's elapsed_ms (its findings work):   bare runs {row['server_elapsed_ms_bare']:.0f} ms, client runs {row['server_elapsed_ms_client']:.0f} ms",
        f"  time outside the findings work (upload, session, transfer, parsing, files): bare {row['outside_server_ms_bare']:.0f} ms, "
        f"client {row['outside_server_ms_client']:.0f} ms",
        f"  added by the client layer: {row['client_layer_ms']:+.0f} ms = {row['overhead_pct']:+.1f}% of the bare round trip (bar: < 10%)",
        f"  (direct ratio of the medians, which carries the server's run-to-run noise: {row['direct_ratio_pct']:+.1f}%)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="", help="an HLIP server already running (default: start a tiny one on a free port)")
    parser.add_argument("--repeats", type=int, default=5, help="timed round trips per way (default: 5)")
    parser.add_argument("--scans", type=int, default=4, help="volumes in the uploaded study (default: 4)")
    parser.add_argument("--shape", default="48,192,192", help="voxels per volume, slices,rows,columns (default: 48,192,192)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server started here (default: 1)")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    with tempfile.TemporaryDirectory(prefix="hlip-slicer-bench-") as tmp:
        tmp = Path(tmp)
        files = make_study(tmp / "study", args.scans, shape)
        if args.url:
            row = measure(args.url, files, FINDINGS, args.repeats)
        else:
            from server_helpers import make_checkpoint, monailabel_server

            checkpoint = make_checkpoint(tmp / "ckpt")
            (tmp / "studies").mkdir()
            conf = {"cache_dir": tmp / "cache", "threads": args.threads, "index": "false", "max_upload_mb": 4096}
            with monailabel_server(str(tmp / "studies"), checkpoint, tmp / "server", conf, timeout=600) as (url, _):
                row = measure(url, files, FINDINGS, args.repeats)
    print(f"command: python benchmarks/slicer_client.py {' '.join(sys.argv[1:])}  ({os.cpu_count()} CPUs)")
    print(report(row))


if __name__ == "__main__":
    main()
