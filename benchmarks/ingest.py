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
    python benchmarks/ingest.py --scale 10000 100000 [--scale-workers 1 2]    # only section 4

4. Scale (--scale N ...): a tree of about N files made by copying real T1 slices (every 2nd slice
   of the 384, so 192 files a study, pixels cropped to the central 128x128 to keep 100,000 files near
   3.5 GB) with new Study/Series/SOP Instance UIDs; per N: files/s of the header pass (discovery) and
   the whole command's time, studies/s and peak resident memory of the largest process, with the
   --scale-workers counts. The tree is written in the scratch folder and deleted after each N.

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
    shutil.rmtree(folder, ignore_errors=True)  # a reused --work folder must not hold an older series
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


def issue22_tree(root: Path, t1: Path) -> tuple[Path, dict]:
    """The tree of issue 22: the real T1 series, a synthetic 4D fMRI series of 5,460 files (42
    slices x 130 time points, 64x64) in the same study, and junk: a truncated copy of one T1 slice
    read before the intact file, a non-DICOM file named .dcm, a DICOMDIR and an empty file."""
    import pydicom
    from pydicom.fileset import FileSet

    tree = root / "tree22"
    counts = {"valid": 384 + 5460, "junk": 4}
    if (root / "tree22.done").exists():  # made by an earlier run with the same --work
        return tree, counts
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(t1, tree / "t1")
    study_uid = str(pydicom.dcmread(next((tree / "t1").iterdir()), stop_before_pixels=True).StudyInstanceUID)
    write_series(tree / "fmri", n=42, rows=64, cols=64, pixel_spacing=(3.0, 3.0), step=3.0, modality="MR", intercept=0.0,
                 description="synthetic BOLD", study_uid=study_uid, series_number=9, repeats=130, shuffle=5)
    victim = sorted((tree / "t1").iterdir())[99]
    (tree / "a_interrupted_export").mkdir()
    cut = tree / "a_interrupted_export" / victim.name
    cut.write_bytes(victim.read_bytes()[: int(victim.stat().st_size * 0.6)])
    (tree / "junk").mkdir()
    (tree / "junk" / "export_log.dcm").write_text("exported 5845 files\n")
    (tree / "junk" / "empty.dcm").write_bytes(b"")
    media = root / "media_tmp"
    shutil.rmtree(media, ignore_errors=True)
    fs = FileSet()
    for f in sorted((tree / "t1").iterdir())[:3]:
        fs.add(str(f))
    fs.write(media)
    shutil.copyfile(media / "DICOMDIR", tree / "DICOMDIR")  # an index of files lying elsewhere
    shutil.rmtree(media)
    (root / "tree22.done").write_text("")
    return tree, counts


def scale_templates(t1: Path, work: Path, every: int = 2, crop: int = 128) -> list[tuple[bytes, tuple[bytes, ...]]]:
    """Every ``every``-th real T1 slice, pixels cropped to the central crop x crop, as file bytes
    with the UIDs a copy must change: [(bytes, (study, series, sop UID as stored))]."""
    import io

    import pydicom

    out = []
    for path in sorted(t1.iterdir())[::every]:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
        r0, c0 = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
        ds.PixelData = arr[r0: r0 + crop, c0: c0 + crop].copy().tobytes()
        ds.Rows = ds.Columns = crop
        # the crop's first pixel moves along the row and column directions
        row, col = (float(v) for v in ds.PixelSpacing)
        o = [float(v) for v in ds.ImageOrientationPatient]
        ds.ImagePositionPatient = [float(p) + c0 * col * o[i] + r0 * row * o[3 + i] for i, p in enumerate(ds.ImagePositionPatient)]
        buf = io.BytesIO()
        ds.save_as(buf, write_like_original=False)
        out.append((buf.getvalue(), tuple(str(ds[t].value).encode() for t in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))))
    return out


def _renumbered(uid: bytes, i: int) -> bytes:
    """The UID with its last 8 digits replaced by i (same length, so the file's lengths stay)."""
    return uid[:-8] + b"%08d" % i


def scale_tree(root: Path, templates: list, files: int) -> tuple[Path, int, int]:
    """ceil(files / len(templates)) studies of copies of the templates with new UIDs, 1,000 files a folder."""
    tree = root / "scale_tree"
    shutil.rmtree(tree, ignore_errors=True)
    studies = -(-files // len(templates))
    n = 0
    folder = tree
    for i in range(studies):
        for data, (study, series, sop) in templates:
            if n % 1000 == 0:
                folder = tree / f"{n // 1000:04d}"
                folder.mkdir(parents=True)
            new = data.replace(study, _renumbered(study, i)).replace(series, _renumbered(series, i)).replace(sop, _renumbered(sop, i))
            (folder / f"IM{n:07d}.dcm").write_bytes(new)
            n += 1
    return tree, n, studies


def _peak_command(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd; (result, wall seconds, peak resident MB of its largest process, workers included)."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); w = time.perf_counter() - t; "
             "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); "
             "print('probe:', w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); sys.exit(r.returncode)")
    run = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next(x for x in run.stdout.splitlines() if x.startswith("probe: "))
    wall, peak = (float(v) for v in line.split()[1:])
    return run, wall, peak


def scale(t1: Path, work: Path, sizes: list[int], workers: list[int]) -> None:
    from hlip_core.data import discover_studies
    from hlip_core.data.study import KEEP_HEADERS

    templates = scale_templates(t1, work)
    print(f"  templates: {len(templates)} real T1 slices cropped to 128x128, {len(templates[0][0])} bytes a file; "
          f"headers kept from discovery: up to {KEEP_HEADERS}")
    for size in sizes:
        t = time.perf_counter()
        tree, files, studies = scale_tree(work, templates, size)
        made = time.perf_counter() - t
        du = sum(p.stat().st_size for p in tree.rglob("*.dcm"))
        print(f"  {files} files, {studies} studies, {du / 2**30:.2f} GB (written in {made:.0f} s); free disk {shutil.disk_usage(work).free / 2**30:.0f} GB")
        try:
            for w in workers:
                t = time.perf_counter()
                found = discover_studies(tree, workers=w)
                sec = time.perf_counter() - t
                assert len(found.studies) == studies and not found.skipped, (len(found.studies), len(found.skipped))
                print(f"   header pass, {w} worker(s): {sec:.1f} s, {files / sec:.0f} files/s; load {os.getloadavg()[0]:.1f}")
                del found
            for w in workers:
                out = work / f"scale_out_w{w}"
                shutil.rmtree(out, ignore_errors=True)
                run, wall, peak = _peak_command([sys.executable, str(REPO / "train" / "prepare.py"), str(tree), str(out),
                                                 "--workers", str(w), "--no-progress", "--log-level", "WARNING"])
                if run.returncode != 0:
                    raise RuntimeError(run.stdout[-2000:] + run.stderr[-2000:])
                summary = json.loads(next(x for x in run.stdout.splitlines() if x.startswith("summary: "))[len("summary: "):])
                assert summary["prepared"] == studies and summary["scans"] == studies and not summary["skipped"], summary
                print(f"   whole prepare, {w} worker(s): {wall:.1f} s wall, {summary['studies_per_second']:.2f} studies/s, "
                      f"{files / wall:.0f} files/s, peak memory of the largest process {peak:.0f} MB; load {os.getloadavg()[0]:.1f}")
                shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(tree, ignore_errors=True)


def stage_profile(tree: Path, work: Path, max_volumes: int = 16) -> dict:
    """The stages of prepare run one after the other in this process (1 worker), seconds each."""
    import numpy as np

    from hlip_core.data import IngestOptions, PreprocessSettings, to_model_space
    from hlip_core.data.archive import _atomic_npy
    from hlip_core.data.dicom import HeaderError, assemble, read_header
    from hlip_core.data.preprocess import to_storage
    from hlip_core.data.study import list_files, plan_study

    t = {}
    t0 = time.perf_counter()
    files = list_files(tree)
    t["walk"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    instances, bad = [], 0
    for f in files:
        try:
            instances.append(read_header(f))
        except HeaderError:
            bad += 1
    t["headers"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    opts = IngestOptions(max_volumes=max_volumes)
    by_study: dict = {}
    for inst in instances:
        by_study.setdefault(inst.study_uid, []).append(inst)
    plans = [plan_study([i.path for i in insts], opts, instances=insts) for insts in by_study.values()]
    t["grouping (incl. copy resolution)"] = time.perf_counter() - t0
    settings = PreprocessSettings()
    t.update({"pixels": 0.0, "resampling": 0.0, "writing": 0.0})
    out = work / "profile_out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n = 0
    for plan in plans:
        for vp in plan.dicom:
            t0 = time.perf_counter()
            image = assemble(vp)
            t1 = time.perf_counter()
            array, _ = to_model_space(image, vp.modality, settings)
            t2 = time.perf_counter()
            _atomic_npy(out / f"{n}.npy", to_storage(array, settings.storage))
            t3 = time.perf_counter()
            t["pixels"] += t1 - t0
            t["resampling"] += t2 - t1
            t["writing"] += t3 - t2
            n += 1
    t = {k: round(v, 3) for k, v in t.items()}
    return {"files": len(files), "not DICOM": bad, "volumes": n, **t, "total": round(sum(t.values()), 3)}


def tree_vs_dcm2niix(tree: Path, work: Path, counts: dict, repeats: int, workers: int) -> dict:
    """The whole train/prepare.py command and dcm2niix on the same tree, in turns (median)."""
    out = work / "tree_dcm2niix"

    def dcm2niix():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run = subprocess.run(["dcm2niix", "-z", "n", "-o", str(out), str(tree)], capture_output=True, text=True)
        if not list(out.glob("*.nii")):
            raise RuntimeError(f"dcm2niix failed: {run.stdout[-500:]} {run.stderr[-500:]}")

    ours, theirs, last = [], [], None
    for k in range(repeats + 1):  # the first turn warms the file cache and is not counted
        r = whole_command(tree, work, workers)
        t = time_once(dcm2niix)
        if k:
            ours.append(r["wall s (with interpreter start)"])
            theirs.append(t)
        last = r
    prepared = work / f"prepared_w{workers}"
    lines = [json.loads(x) for x in (prepared / "skipped.jsonl").read_text().splitlines()]
    entries = [json.loads(x) for x in (prepared / "manifest.jsonl").read_text().splitlines()]
    sidecars = sum(json.loads((prepared / sc["sidecar"]).read_text())["files"] for e in entries for sc in e["scans"])
    not_selected = sum(len(x["files"]) for x in lines if x["reason"] == "volume_not_selected")
    junk = sorted((x["reason"], x["files"][0]) for x in lines if x["kind"] == "file")
    interpolated = sum("interpolated_slices" in json.dumps(e) for e in entries)
    med_o, med_t = statistics.median(ours), statistics.median(theirs)
    return {"workers": workers, "prepare wall s": round(med_o, 3), "prepare command s": last["command s"],
            "dcm2niix s": round(med_t, 3), "prepare / dcm2niix": round(med_o / med_t, 2),
            "files in kept volumes": sidecars, "files of volumes not selected (--max-volumes)": not_selected,
            "valid files": counts["valid"], "valid files lost": counts["valid"] - sidecars - not_selected,
            "files reported": junk, "scans with interpolated slices": interpolated, "scans": last["scans"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=24, help="studies in the synthetic archive (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each conversion (default: %(default)s)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--tree-workers", type=int, nargs="+", default=[1, 2],
                        help="--workers of the prepare runs on issue 22's tree (default: %(default)s)")
    parser.add_argument("--tree-only", action="store_true", help="only section 0 (issue 22's tree)")
    parser.add_argument("--scale", type=int, nargs="+", default=None, metavar="FILES",
                        help="only section 4: trees of about this many files (for example 10000 100000)")
    parser.add_argument("--scale-workers", type=int, nargs="+", default=[1, 2], help="--workers of section 4 (default: %(default)s)")
    args = parser.parse_args()
    if not shutil.which("dcm2niix"):
        sys.exit("dcm2niix is not installed (Debian package dcm2niix; .ci/run installs it)")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hlip_ingest_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        version = subprocess.run(["dcm2niix", "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        print(f"dcm2niix: {version[-1] if version else '?'}; cpus: {os.cpu_count()}; "
              f"load average at start: {os.getloadavg()[0]:.1f} (other work on the machine)")
        if args.scale:
            print("\n4. scale: copies of real T1 slices with new UIDs")
            scale(benchmark_mri_dicom_dir(), work, args.scale, args.scale_workers)
            return
        print("\n1. assembly vs dcm2niix (median of", args.repeats, "runs, in turns)")
        real = assembly_vs_dcm2niix(benchmark_mri_dicom_dir(), work, args.repeats)
        print("  real MRI (384x274 slices):", json.dumps(real))
        ct = assembly_vs_dcm2niix(synthetic_ct(work / "ct200"), work, args.repeats)
        print("  synthetic CT 200 x 512x512:", json.dumps(ct))
        print("\n0. issue 22's tree (real T1 384 files + synthetic 4D fMRI 5,460 files + 4 junk files)")
        tree, counts = issue22_tree(work, benchmark_mri_dicom_dir())
        print("  stage profile, 1 process:", json.dumps(stage_profile(tree, work)))
        for w in args.tree_workers:
            print("  whole prepare vs dcm2niix:", json.dumps(tree_vs_dcm2niix(tree, work, counts, args.repeats, w)))
        if args.tree_only:
            return
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
