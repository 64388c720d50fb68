"""Whole archives: discovery by header only, prepare_archive (manifest, arrays, sidecars, reports),
resume after a kill, shards and their merge, the command line, and privacy of every output."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_factory import (ACCESSION, BIRTH_DATE, PATIENT_ID, PATIENT_NAME, write_junk, write_localizer, write_series,
                           write_sr)
from hlip_core.data import (PreprocessSettings, discover_studies, load_study, merge_shards, prepare_archive,
                            to_model_space, to_scan_space)
from hlip_core.data.archive import in_shard
from hlip_core.data.manifest import load_scan, read_manifest, read_settings
from hlip_core.data.preprocess import to_storage

REPO = Path(__file__).resolve().parent.parent
GRID = (8, 16, 16)


def nifti_archive(root: Path, n: int = 4) -> list[str]:
    """n study folders of two NIfTI scans each, plus a reports.csv keyed by folder name."""
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        sid = f"case{i:03d}"
        ids.append(sid)
        for name in ("t1", "flair"):
            img = sitk.GetImageFromArray(rng.random((12, 20, 18)).astype(np.float32))
            img.SetSpacing((1.0, 1.1, 2.0))
            (root / "src" / sid).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(img, str(root / "src" / sid / f"{name}.nii.gz"))
    with open(root / "reports.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["study_id", "report", "mass", "bleed"])
        for i, sid in enumerate(ids):
            w.writerow([sid, f"Study {i}. There is a mass in the left lobe. No bleeding.", i % 2, ""])
    return ids


def dicom_archive(root: Path, n: int = 3, slices: int = 10) -> list:
    """n DICOM studies spread over nested folders, each with a kept series, a localizer and an SR;
    one study spread over two folders; a foreign file at the top."""
    studies = []
    for i in range(n):
        uid = generate_uid()
        folder = root / "pacs" / f"export{i % 2}" / f"st{i}"
        a = write_series(folder / "a", n=slices, study_uid=uid, series_number=2, shuffle=i)
        b = write_series(root / "pacs" / "other" / f"st{i}", n=slices, study_uid=uid, series_number=3, modality="MR",
                         intercept=0.0, shuffle=i + 10)
        write_localizer(folder / "a", uid)
        write_sr(folder / f"sr{i}", uid)
        studies.append((uid, a, b))
    write_junk(root / "pacs" / "README.txt")
    return studies


# -- discovery ---------------------------------------------------------------------------------------


def test_discovery_groups_dicom_by_study_uid_across_folders_and_volumes_by_folder(tmp_path):
    studies = dicom_archive(tmp_path, n=3)
    nifti_archive(tmp_path / "nii", n=2)
    found = discover_studies(tmp_path)
    by_id = {s.study_id: s for s in found}
    for uid, a, b in studies:
        assert by_id[uid].kind == "dicom"
        assert set(map(str, a.files + b.files)) <= set(by_id[uid].files)
    assert by_id["nii/src/case000"].kind == "volumes" and len(by_id["nii/src/case000"].files) == 2
    assert [s.reason for s in found.skipped] == ["not_dicom", "not_dicom"]  # README.txt and reports.csv
    assert len(found) == 5


def test_discovery_of_10000_files_reads_no_pixel_data(tmp_path):
    """10,000 DICOM files of 512x512 16-bit pixels (sparse on disk): discovery must read a few KB of
    each, not the 5 GB of pixel data; measured with the kernel's count of bytes read (rchar)."""
    pixel_bytes = 512 * 512 * 2
    headers = {}
    for s in range(10):
        uid = generate_uid()
        w = write_series(tmp_path / "tmpl", n=1, rows=512, cols=512, study_uid=uid, name=lambda i, s=s: f"t{s}")
        raw = w.files[0].read_bytes()
        headers[uid] = raw[: len(raw) - pixel_bytes]
    (tmp_path / "tmpl").rename(tmp_path / "templates")
    root = tmp_path / "many"
    for s, (uid, head) in enumerate(headers.items()):
        folder = root / f"s{s}"
        folder.mkdir(parents=True)
        for k in range(1000):
            with open(folder / f"{k:05d}", "wb") as fh:
                fh.write(head)
                fh.truncate(len(head) + pixel_bytes)  # a hole: pixel data costs no disk and no write
    io_before = _rchar()
    found = discover_studies(root)
    read = _rchar() - io_before
    assert sorted(s.study_uid for s in found) == sorted(headers)
    assert all(len(s.files) == 1000 for s in found)
    total_pixels = 10_000 * pixel_bytes
    print(f"discovery read {read / 1e6:.1f} MB")
    assert read < 0.02 * total_pixels, f"discovery read {read / 1e6:.0f} MB for {total_pixels / 1e9:.1f} GB of pixels"


def test_discovery_memory_is_flat_in_the_number_of_files(tmp_path):
    """Discovery keeps per file only its path and study key, not its parsed header (~4 KB): the
    traced peak grows by less than 3 KB per extra file (paths and study keys; 0.2-1.7 KB measured) where it grew by ~3.9 KB more per file when every header
    was collected before grouping), and keep_headers caps the headers kept for planning."""
    template = write_series(tmp_path / "tmpl", n=1, rows=64, cols=64, study_uid=generate_uid()).files[0].read_bytes()
    peaks = {}
    for n in (1000, 4000):
        root = tmp_path / f"many{n}"
        root.mkdir()
        for k in range(n):
            (root / f"{k:05d}").write_bytes(template)
        tracemalloc.start()
        try:
            found = discover_studies(root, keep_headers=0)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert sum(len(s.files) for s in found) == n and all(s.instances is None for s in found)
    per_file = (peaks[4000] - peaks[1000]) / 3000
    assert per_file < 3000, f"discovery's peak memory grows by {per_file:.0f} bytes per file"
    kept = discover_studies(tmp_path / "many1000", keep_headers=300)
    assert sum(len(s.instances or []) for s in kept) == 300


def _rchar() -> int:
    with open("/proc/self/io") as fh:
        return int(next(line for line in fh if line.startswith("rchar:")).split()[1])


# -- prepare_archive -------------------------------------------------------------------------------


def test_prepare_archive_of_nifti_folders_with_reports_and_labels(tmp_path, monkeypatch):
    ids = nifti_archive(tmp_path, n=3)
    monkeypatch.chdir(tmp_path)  # the report file given by a relative name, as the training demo does
    out = tmp_path / "prepared"
    summary = prepare_archive(tmp_path / "src", out, settings=PreprocessSettings(target_shape=GRID), reports="reports.csv",
                              report_key="study_id", report_column="report", label_columns=["mass", "bleed"], progress=False)
    assert summary["studies"] == 3 and summary["prepared"] == 3 and summary["scans"] == 6 and summary["complete"]
    assert summary["reports_matched"] == 3 and summary["failed"] == 0
    records = read_manifest(out)
    assert [r["study_id"] for r in records] == ids
    first = records[0]
    assert first["sentences"] == ["Study 0.", "There is a mass in the left lobe.", "No bleeding."]
    assert first["labels"] == {"mass": 0} and records[1]["labels"] == {"mass": 1}  # empty cells are left out
    assert [s["scan_id"] for s in first["scans"]] == ["flair", "t1"]
    assert read_settings(out) == PreprocessSettings(target_shape=GRID).to_dict()
    for scan in first["scans"]:
        arr = load_scan(out, scan)
        assert arr.shape == GRID and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
        assert scan["dtype"] == "uint8" and scan["modality"] == "MR"


def test_stored_arrays_are_the_model_space_arrays_and_sidecars_map_back(tmp_path):
    studies = dicom_archive(tmp_path, n=1)
    out = tmp_path / "out"
    settings = PreprocessSettings(target_shape=GRID, storage="float16")
    prepare_archive(tmp_path / "pacs", out, settings, progress=False)
    (record,) = read_manifest(out)
    uid, a, b = studies[0]
    assert record["study_id"] == uid
    assert [s["scan_id"] for s in record["scans"]] == [a.series_uid, b.series_uid]
    scan = record["scans"][0]
    study = load_study([str(f) for f in a.files])
    expected, _ = to_model_space(study.scans[0].image, "CT", settings)
    np.testing.assert_array_equal(np.load(out / scan["path"]), to_storage(expected, "float16"))
    side = json.loads((out / scan["sidecar"]).read_text())
    heat = to_scan_space(np.ones(GRID, np.float32), side["transform"])
    assert heat.GetSize() == study.scans[0].image.GetSize() and heat.GetOrigin() == study.scans[0].image.GetOrigin()
    assert side["header"]["kvp"] == 120.0 and scan["size"] == [20, 16, 10]


def test_skipped_files_and_series_are_listed_with_reasons(tmp_path):
    dicom_archive(tmp_path, n=2)
    out = tmp_path / "out"
    summary = prepare_archive(tmp_path / "pacs", out, PreprocessSettings(target_shape=GRID), progress=False)
    assert summary["skipped"] == {"localizer": 2, "not_dicom": 1, "not_image": 2}
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert {x["reason"] for x in lines} == {"localizer", "not_dicom", "not_image"}
    assert all(x["text"] and x["files"] for x in lines)
    assert not any(os.path.isabs(f) for x in lines for f in x["files"])  # paths relative to the source


def test_reports_match_dicom_studies_by_accession_number(tmp_path):
    studies = dicom_archive(tmp_path, n=1)
    (tmp_path / "r.jsonl").write_text(json.dumps({"acc": ACCESSION, "text": "Normal head CT."}) + "\n")
    out = tmp_path / "out"
    summary = prepare_archive(tmp_path / "pacs", out, PreprocessSettings(target_shape=GRID), reports=tmp_path / "r.jsonl",
                              report_key="acc", report_column="text", report_match="accession", progress=False)
    assert summary["reports_matched"] == 1
    assert read_manifest(out)[0]["sentences"] == ["Normal head CT."]
    assert ACCESSION not in (out / "manifest.jsonl").read_text()


def test_a_study_without_usable_scans_is_reported_and_not_in_the_manifest(tmp_path):
    uid = generate_uid()
    write_localizer(tmp_path / "src" / "only_scout", uid)
    nifti_archive(tmp_path, n=1)
    out = tmp_path / "out"
    summary = prepare_archive(tmp_path / "src", out, PreprocessSettings(target_shape=GRID), progress=False)
    assert summary["without_scans"] == 1 and summary["prepared"] == 1 and summary["complete"]
    assert [r["study_id"] for r in read_manifest(out)] == ["case000"]
    lines = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(x["study_id"], x["reason"]) for x in lines} == {(uid, "localizer"), (uid, "no_usable_scan")}
    again = prepare_archive(tmp_path / "src", out, PreprocessSettings(target_shape=GRID), progress=False)
    assert again["already_done"] == 2 and again["prepared"] == 0 and again["without_scans"] == 0


def test_other_settings_in_the_same_output_folder_are_refused(tmp_path):
    nifti_archive(tmp_path, n=1)
    prepare_archive(tmp_path / "src", tmp_path / "out", PreprocessSettings(target_shape=GRID), progress=False)
    with pytest.raises(ValueError, match="other preprocessing settings"):
        prepare_archive(tmp_path / "src", tmp_path / "out", PreprocessSettings(target_shape=(8, 16, 24)), progress=False)


def test_two_workers_give_the_same_manifest_as_one(tmp_path):
    nifti_archive(tmp_path, n=4)
    dicom_archive(tmp_path / "src", n=2)
    s = PreprocessSettings(target_shape=GRID)
    one = prepare_archive(tmp_path / "src", tmp_path / "one", s, progress=False)
    two = prepare_archive(tmp_path / "src", tmp_path / "two", s, progress=False, workers=2)
    assert one["scans"] == two["scans"] == 12 and two["workers"] == 2
    assert (tmp_path / "one" / "manifest.jsonl").read_text() == (tmp_path / "two" / "manifest.jsonl").read_text()
    for r in read_manifest(tmp_path / "one"):
        for scan in r["scans"]:
            assert (tmp_path / "one" / scan["path"]).read_bytes() == (tmp_path / "two" / scan["path"]).read_bytes()


# -- resume ----------------------------------------------------------------------------------------


def test_a_run_killed_mid_way_leaves_whole_studies_and_the_next_run_finishes(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(24):
        img = sitk.GetImageFromArray(rng.random((40, 96, 96)).astype(np.float32))
        (tmp_path / "src" / f"s{i:02d}").mkdir(parents=True)
        sitk.WriteImage(img, str(tmp_path / "src" / f"s{i:02d}" / "vol.nii.gz"))
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train" / "prepare.py"), str(tmp_path / "src"), str(out),
           "--target-shape", "8", "16", "16", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make the studies bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = read_manifest(out)
    assert 3 <= len(done) < 24
    for r in done:  # every study in the manifest is whole: its arrays exist and load
        for scan in r["scans"]:
            assert load_scan(out, scan).shape == (8, 16, 16)
    stamps = {r["study_id"]: os.stat(out / r["scans"][0]["path"]).st_mtime_ns for r in done}
    finished = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert f"{len(done)} already done" in finished.stdout and "\ncomplete" in finished.stdout
    records = read_manifest(out)
    assert [r["study_id"] for r in records] == [f"s{i:02d}" for i in range(24)]
    for sid, stamp in stamps.items():  # finished studies were not prepared again
        path = out / next(r for r in records if r["study_id"] == sid)["scans"][0]["path"]
        assert os.stat(path).st_mtime_ns == stamp
    assert not list(out.rglob("*.tmp"))


def test_a_torn_last_line_and_stale_temporary_files_are_cleaned_on_resume(tmp_path):
    ids = nifti_archive(tmp_path, n=3)
    out = tmp_path / "out"
    s = PreprocessSettings(target_shape=GRID)
    prepare_archive(tmp_path / "src", out, s, progress=False)
    lines = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    # as if killed while writing the third study's line and its arrays
    (out / "manifest.jsonl").write_text("".join(lines[:2]) + lines[2][:40])
    stale = out / "arrays" / ids[2] / ".t1.npy.123.tmp"
    stale.write_bytes(b"partial")
    summary = prepare_archive(tmp_path / "src", out, s, progress=False)
    assert summary["already_done"] == 2 and summary["prepared"] == 1
    assert [r["study_id"] for r in read_manifest(out)] == ids
    assert not stale.exists()


# -- shards ----------------------------------------------------------------------------------------


def test_shards_split_by_study_and_merge_into_the_whole(tmp_path):
    ids = nifti_archive(tmp_path, n=8)
    s = PreprocessSettings(target_shape=GRID)
    whole = prepare_archive(tmp_path / "src", tmp_path / "whole", s, progress=False)
    parts = [prepare_archive(tmp_path / "src", tmp_path / "sharded", s, shard=f"{i}/3", progress=False) for i in range(3)]
    assert sum(p["studies"] for p in parts) == whole["studies"] == 8
    assert all(p["complete"] for p in parts)
    in_parts = [{r["study_id"] for r in read_manifest(tmp_path / "sharded" / f"manifest.shard-{i}-of-3.jsonl")} for i in range(3)]
    assert set.union(*in_parts) == set(ids) and sum(map(len, in_parts)) == 8  # nothing twice, nothing lost
    for i, part in enumerate(in_parts):
        assert all(in_shard(sid, (i, 3)) for sid in part)
    merged = merge_shards(tmp_path / "sharded")
    assert merged["studies"] == 8 and merged["scans"] == 16
    assert (tmp_path / "sharded" / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()


def test_merge_refuses_missing_or_unfinished_shards(tmp_path):
    nifti_archive(tmp_path, n=4)
    s = PreprocessSettings(target_shape=GRID)
    prepare_archive(tmp_path / "src", tmp_path / "o", s, shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match=r"shards \[1\] of 2 are missing"):
        merge_shards(tmp_path / "o")
    prepare_archive(tmp_path / "src", tmp_path / "o", s, shard=(1, 2), progress=False)
    summary = json.loads((tmp_path / "o" / "summary.shard-1-of-2.json").read_text())
    (tmp_path / "o" / "summary.shard-1-of-2.json").write_text(json.dumps({**summary, "complete": False}))
    with pytest.raises(ValueError, match="not complete"):
        merge_shards(tmp_path / "o")


def test_shards_prepared_in_separate_folders_merge_with_paths_relative_to_the_result(tmp_path):
    nifti_archive(tmp_path, n=4)
    s = PreprocessSettings(target_shape=GRID)
    for i in range(2):
        prepare_archive(tmp_path / "src", tmp_path / f"machine{i}", s, shard=(i, 2), progress=False)
    (tmp_path / "final").mkdir()
    merge_shards(tmp_path / "final", parts=[tmp_path / "machine0", tmp_path / "machine1"])
    records = read_manifest(tmp_path / "final")
    assert len(records) == 4
    for r in records:
        assert load_scan(tmp_path / "final", r["scans"][0]).shape == GRID


# -- command line and privacy -----------------------------------------------------------------------


def test_the_command_documents_every_option_and_its_default():
    out = subprocess.run([sys.executable, str(REPO / "train" / "prepare.py"), "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for option in ("--target-shape", "--spacing", "--ct-window", "--percentiles", "--storage", "--workers", "--shard",
                   "--merge", "--reports", "--report-key", "--report-column", "--label-columns", "--min-slices",
                   "--exclude-derived", "--max-gap", "--repeated", "--volume-modality", "--study-ids"):
        assert option in text
    assert "(default: [-1150.0, 350.0])" in text and "(default: [48, 224, 224])" in text


def test_no_patient_identifier_reaches_any_output_or_log(tmp_path):
    dicom_archive(tmp_path, n=2)
    # a broken file of a known series: its error goes through the logs too
    victim = next((tmp_path / "pacs").rglob("a/*"))
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 50])
    (tmp_path / "r.csv").write_text(f"acc,report\n{ACCESSION},Unremarkable.\n")
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "train" / "prepare.py"), str(tmp_path / "pacs"), str(out), "--target-shape", "8", "16",
           "16", "--reports", str(tmp_path / "r.csv"), "--report-key", "acc", "--log-level", "DEBUG", "--workers", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    assert "truncated" in (out / "skipped.jsonl").read_text()
    texts = [run.stdout, run.stderr] + [p.read_text(errors="replace") for p in out.rglob("*") if p.suffix in (".json", ".jsonl")]
    forbidden = [*PATIENT_NAME.split("^"), PATIENT_ID, BIRTH_DATE, ACCESSION]
    for text in texts:
        for value in forbidden:
            assert value not in text
    assert pydicom.dcmread(victim, force=True).PatientID == PATIENT_ID  # the values really were in the input


def test_the_command_prepares_shards_and_merges_them(tmp_path):
    nifti_archive(tmp_path, n=4)
    base = [sys.executable, str(REPO / "train" / "prepare.py"), str(tmp_path / "src"), str(tmp_path / "out"),
            "--target-shape", "8", "16", "16", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i in range(2):
        run = subprocess.run(base + ["--shard", f"{i}/2"], capture_output=True, text=True, env=env)
        assert run.returncode == 0 and f"(shard {i}/2)" in run.stdout, run.stderr
    run = subprocess.run(base + ["--merge"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "merged 2 shards: 4 studies, 8 scans" in run.stdout, run.stderr
    assert [r["study_id"] for r in read_manifest(tmp_path / "out")] == [f"case{i:03d}" for i in range(4)]
    bad = subprocess.run(base + ["--shard", "2/2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "need 0 <= I < N" in bad.stderr


def _peak_rss_since_reset(fn) -> float:
    """MB of peak resident memory while fn runs (Linux: /proc/self/clear_refs resets the peak)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    fn()
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def test_memory_is_bounded_by_the_largest_series_not_by_the_archive(tmp_path):
    """Preparing 16 studies needs no more memory than preparing 2 of the same size: nothing of a
    finished study is kept (each series is 64x160x160 float32, 6.5 MB)."""
    rng = np.random.default_rng(0)
    for i in range(16):
        (tmp_path / "src" / f"s{i:02d}").mkdir(parents=True)
        for name in ("a", "b"):
            sitk.WriteImage(sitk.GetImageFromArray(rng.random((64, 160, 160), dtype=np.float32)),
                            str(tmp_path / "src" / f"s{i:02d}" / f"{name}.nii"))
    (tmp_path / "few").mkdir()
    for i in range(2):
        os.symlink(tmp_path / "src" / f"s{i:02d}", tmp_path / "few" / f"s{i:02d}")
    s = PreprocessSettings(target_shape=(16, 32, 32))
    prepare_archive(tmp_path / "few", tmp_path / "warm", s, progress=False)  # first-use allocations
    few = _peak_rss_since_reset(lambda: prepare_archive(tmp_path / "few", tmp_path / "o1", s, progress=False))
    many = _peak_rss_since_reset(lambda: prepare_archive(tmp_path / "src", tmp_path / "o2", s, progress=False))
    assert len(read_manifest(tmp_path / "o2")) == 16
    # keeping one series per extra study would add 14 x 6.5 = 91 MB; the allocator's own slack is ~20 MB
    assert many - few < 50, f"peak memory grew from {few:.0f} MB (2 studies) to {many:.0f} MB (16 studies)"


def test_prepare_with_the_released_preset_writes_the_released_settings_and_refuses_what_it_fixes(tmp_path):
    """Data for a released model: `--preset released` prepares with the released pipeline (recorded
    in preprocess.json, so evaluate/predict see the data match the model), arrays equal
    to_model_space with those settings; options the preset fixes are refused by name."""
    nifti_archive(tmp_path, n=1)
    out = tmp_path / "out"
    base = [sys.executable, str(REPO / "train" / "prepare.py"), str(tmp_path / "src"), str(out), "--no-progress",
            "--preset", "released", "--target-shape", "8", "16", "16"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(base, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    settings = PreprocessSettings.from_dict(read_settings(out))
    expected = PreprocessSettings.from_dict({"preset": "released", "target_shape": (8, 16, 16)})
    assert settings == expected and settings.orientation == "RPI" and not settings.antialias
    record = read_manifest(out)[0]
    img = sitk.ReadImage(str(tmp_path / "src" / "case000" / "flair.nii.gz"))
    want = to_storage(to_model_space(img, "MR", expected)[0], "uint8")
    got = [load_scan(out, s, as_float=False) for s in record["scans"]]
    assert any(g.shape == want.shape and np.array_equal(g, want) for g in got)
    refused_out = tmp_path / "refused"
    refused = subprocess.run(base[:3] + [str(refused_out), "--preset", "released", "--orientation", "RAS", "--storage", "float16"],
                             cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--preset released fixes --orientation, --storage" in refused.stderr
    assert not refused_out.exists()
