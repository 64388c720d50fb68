"""Ingestion speed: DICOM assembly against dcm2niix, header-only discovery, and the whole
train/prepare.py command with 1 and 2 workers.

1. Assembly vs dcm2niix on the same series, timed in turns in one run (median of --repeats):
   the real MRI (the 384-slice series with HLIP_SHARED_DATA set, else the 48-slice excerpt in
   tests/data) and a synthetic 512x512 CT series. "assembly" is
   hlip_core.data.load_study on the folder (headers, ordering, pixels, geometry: a SimpleITK image in
   memory); "assembly + write" adds writing that image as an uncompressed NIfTI, which is what
   dcm2niix (-z n) produces. Ratios > 1 mean dcm2niix is slower.
2. Discovery: header-only files/s over a tree of the synthetic files.
3. The whole command (discovery, assembly, preprocessing to the model grid, arrays, manifest) on a
   synthetic archive of --studies DICOM studies (each: a CT series, an MR series, a localiser and an
   SR), with --workers 1 and 2 in fresh output folders: studies/s as the command reports it, and the
   peak resident memory of the largest process beside the size of the largest series.

    python benchmarks/ingest.py [--studies 24] [--repeats 5] [--work /tmp/hlip_ingest_bench]

The machine is shared: compare ratios measured in the same run, not absolute figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the DICOM writers of the test suite

from dicom_factory import rotation, write_localizer, write_series, write_sr  # noqa: E402
from realdata import benchmark_mri_dicom_dir  # noqa: E402


def time_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def assembly_vs_dcm2niix(folder: Path, work: Path, repeats: int) -> dict:
    import SimpleITK as sitk

    from hlip_core.data import load_study

    out = work / "dcm2niix_out"

    def ours():
        study = load_study(folder)
        assert len(study.scans) == 1, [str(s) for s in study.skipped]

    def ours_write():
        study = load_study(folder)
        sitk.WriteImage(study.scans[0].image, str(work / "ours.nii"), False)

    def dcm2niix():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run = subprocess.run(["dcm2niix", "-z", "n", "-o", str(out), "-f", "%s", str(folder)], capture_output=True, text=True)
        if run.returncode != 0 or not list(out.glob("*.nii")):
            raise RuntimeError(f"dcm2niix failed: {run.stdout[-500:]} {run.stderr[-500:]}")

    for fn in (ours, ours_write, dcm2niix):  # warm the file cache and the imports
        fn()
    times = {"assembly": [], "assembly + write": [], "dcm2niix": []}
    for _ in range(repeats):  # in turns, so that load changes hit all three alike
        times["assembly"].append(time_once(ours))
        times["assembly + write"].append(time_once(ours_write))
        times["dcm2niix"].append(time_once(dcm2niix))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"files": len(list(folder.iterdir())), **{f"{k} s": round(v, 4) for k, v in med.items()},
            "dcm2niix / assembly": round(med["dcm2niix"] / med["assembly"], 2),
            "dcm2niix / (assembly + write)": round(med["dcm2niix"] / med["assembly + write"], 2)}


def synthetic_ct(folder: Path, slices: int = 200) -> Path:
    write_series(folder, n=slices, rows=512, cols=512, pixel_spacing=(0.7, 0.7), step=1.25, axes=rotation(0, 0, 0),
                 modality="CT", description="synthetic CT", shuffle=1)
    return folder


def synthetic_archive(root: Path, studies: int) -> tuple[Path, int]:
    """``studies`` DICOM studies: CT 64x256x256, oblique MR 48x192x192, a localiser and an SR each."""
    from pydicom.uid import generate_uid

    src = root / "archive"
    largest = 0
    for i in range(studies):
        uid = generate_uid()
        folder = src / f"patient{i:03d}" / "study"
        write_series(folder / "ct", n=64, rows=256, cols=256, step=2.0, study_uid=uid, series_number=2, shuffle=i, seed=i)
        write_series(folder / "mr", n=48, rows=192, cols=192, step=3.0, axes=rotation(15, 5, 0), modality="MR",
                     intercept=0.0, study_uid=uid, series_number=3, shuffle=i + 1000, seed=i)
        write_localizer(folder / "scout", uid)
        write_sr(folder / "sr.dcm", uid)
        largest = max(largest, 64 * 256 * 256 * 2)
    return src, largest


def discovery_rate(src: Path) -> dict:
    from hlip_core.data import discover_studies

    files = sum(1 for p in src.rglob("*") if p.is_file())
    t = time_once(lambda: discover_studies(src))
    return {"files": files, "seconds": round(t, 3), "files/s": round(files / t, 1)}


def whole_command(src: Path, work: Path, workers: int) -> dict:
    out = work / f"prepared_w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(REPO / "train" / "prepare.py"), str(src), str(out), "--workers", str(workers), "--no-progress",
           "--log-level", "WARNING"]
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t
    if run.returncode != 0:
        raise RuntimeError(run.stdout[-2000:] + run.stderr[-2000:])
    summary = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("summary: "))[len("summary: "):])
    return {"workers": workers, "studies": summary["studies"], "scans": summary["scans"], "skipped": summary["skipped"],
            "command s": round(summary["seconds"], 2), "studies/s": summary["studies_per_second"],
            "wall s (with interpreter start)": round(wall, 2),
            "CPU s per study": summary["cpu_seconds_per_study"], "peak memory of a worker MB": summary["peak_worker_memory_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24, help="studies in the synthetic archive (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each conversion (default: %(default)s)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed at the end)")
    args = parser.parse_args()
    if not shutil.which("dcm2niix"):
        sys.exit("dcm2niix is not installed (Debian package dcm2niix; .ci/run installs it)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hlip_ingest_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        version = subprocess.run(["dcm2niix", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"dcm2niix: {version[-1] if version else '?'}; cpus: {os.cpu_count()}; "
              f"load average at start: {os.getloadavg()[0]:.1f} (other work on the machine)")
        print("\n1. assembly vs dcm2niix (median of", args.repeats, "runs, in turns)")
        real = assembly_vs_dcm2niix(benchmark_mri_dicom_dir(), work, args.repeats)
        print("  real MRI (384x274 slices):", json.dumps(real))
        ct = assembly_vs_dcm2niix(synthetic_ct(work / "ct200"), work, args.repeats)
        print("  synthetic CT 200 x 512x512:", json.dumps(ct))
        src, largest = synthetic_archive(work, args.studies)
        print("\n2. header-only discovery:", json.dumps(discovery_rate(src)))
        print(f"\n3. train/prepare.py on {args.studies} synthetic studies (largest series {largest / 2**20:.1f} MB as int16):")
        results = []
        for w in (1, 2):
            results.append(whole_command(src, work, w))
            results[-1]["load average"] = round(os.getloadavg()[0], 1)
        for r in results:
            print("  ", json.dumps(r))
        print(f"  studies/s with 2 workers / with 1: {results[1]['studies/s'] / results[0]['studies/s']:.2f}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
