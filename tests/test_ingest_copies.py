"""Several files of one SOP instance, on real files (copies of the repository's MRI excerpt): the
intact copy wins whatever the reading order, damaged copies are reported with the copy that was
used, and two intact copies with different pixels are a conflict resolved only by geometry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_factory import truncate
from hlip_core.data import PreprocessSettings, load_study, prepare_archive
from realdata import MRI_EXCERPT_SLICES, real_mri_dicom_dir

VICTIM = 20  # index (sorted by name) of the slice that gets copies: an inner slice, so a gap could be filled


@pytest.fixture(scope="module")
def reference():
    """The excerpt as loaded from the untouched repository folder: [slices, rows, cols]."""
    study = load_study(real_mri_dicom_dir())
    assert len(study.scans) == 1 and study.skipped == []
    return sitk.GetArrayFromImage(study.scans[0].image)


def make_tree(tmp_path: Path) -> tuple[Path, Path]:
    """tmp_path/study/series/*.dcm: the real excerpt; returns (study folder, the victim's file)."""
    series = tmp_path / "study" / "series"
    shutil.copytree(real_mri_dicom_dir(), series)
    victim = sorted(series.glob("*.dcm"))[VICTIM]
    return tmp_path / "study", victim


def add_copy(study: Path, victim: Path, folder: str) -> Path:
    (study / folder).mkdir()
    copy = study / folder / victim.name
    shutil.copyfile(victim, copy)
    return copy


def assert_complete(study, reference):
    """One scan, every real slice, no slice made by interpolation, the pixels of the real files."""
    assert len(study.scans) == 1, [str(s) for s in study.skipped]
    scan = study.scans[0]
    assert "interpolated_slices" not in scan.header
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), reference)
    assert len(scan.files) == MRI_EXCERPT_SLICES


@pytest.mark.parametrize("folder", ["a_partial", "z_partial"], ids=["truncated-read-first", "truncated-read-last"])
def test_an_intact_file_beats_its_truncated_copy_in_either_order(tmp_path, reference, folder):
    study_dir, victim = make_tree(tmp_path)
    copy = truncate(add_copy(study_dir, victim, folder), keep=0.7)
    study = load_study(study_dir)
    assert_complete(study, reference)
    assert f"{folder}/{copy.name}" not in " ".join(study.scans[0].files)
    (skip,) = study.skipped
    assert (skip.reason, skip.files, skip.kept) == ("truncated", [f"{folder}/{copy.name}"], f"series/{victim.name}")
    assert "inside its pixel data" in skip.detail and f"the copy in series/{victim.name} was used" in str(skip)


def test_the_truncated_copy_read_first_is_reported_in_skipped_jsonl_and_costs_nothing(tmp_path, reference):
    study_dir, victim = make_tree(tmp_path)
    truncate(add_copy(study_dir, victim, "a_partial"), keep=0.5)
    out = tmp_path / "out"
    summary = prepare_archive(study_dir, out, PreprocessSettings(target_shape=(8, 32, 32)), progress=False)
    assert summary["scans"] == 1 and summary["failed"] == 0
    (entry,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert "interpolated_slices" not in json.dumps(entry)
    (line,) = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert (line["reason"], line["files"], line["kept"]) == ("truncated", [f"a_partial/{victim.name}"], f"series/{victim.name}")


def test_two_identical_copies_keep_one_and_report_the_other(tmp_path, reference):
    study_dir, victim = make_tree(tmp_path)
    add_copy(study_dir, victim, "retry")
    study = load_study(study_dir)
    assert_complete(study, reference)
    (skip,) = study.skipped  # identical copies: the first path in sorted order is used
    assert (skip.reason, skip.files, skip.kept) == ("duplicate", [f"series/{victim.name}"], f"retry/{victim.name}")


def _altered(study: Path, victim: Path, folder: str, position_of: Path | None = None) -> Path:
    """A copy of ``victim`` with other pixel values (and the position of ``position_of``)."""
    ds = pydicom.dcmread(victim)
    values = ds.pixel_array.copy()
    values[:10] = values.max()
    ds.PixelData = values.tobytes()
    if position_of is not None:
        ds.ImagePositionPatient = pydicom.dcmread(position_of, stop_before_pixels=True).ImagePositionPatient
    (study / folder).mkdir()
    path = study / folder / victim.name
    ds.save_as(path)
    return path


def test_two_intact_copies_with_different_pixels_are_a_reported_conflict(tmp_path):
    study_dir, victim = make_tree(tmp_path)
    altered = _altered(study_dir, victim, "edited")
    study = load_study(study_dir)
    assert study.scans == []
    (skip,) = study.skipped
    assert skip.kind == "series" and skip.reason == "conflict"
    assert skip.files == sorted([f"edited/{altered.name}", f"series/{victim.name}"])
    assert "differ in their pixels" in str(skip)


def test_a_conflict_is_resolved_when_only_one_copy_fits_the_series_geometry(tmp_path, reference):
    study_dir, victim = make_tree(tmp_path)
    neighbour = sorted((study_dir / "series").glob("*.dcm"))[VICTIM + 1]
    _altered(study_dir, victim, "edited", position_of=neighbour)  # its position is another slice's
    study = load_study(study_dir)
    assert_complete(study, reference)
    (skip,) = study.skipped
    assert (skip.reason, skip.files, skip.kept) == ("conflict", [f"edited/{victim.name}"], f"series/{victim.name}")


def test_a_copy_with_a_broken_header_is_reported_and_the_intact_file_used(tmp_path, reference):
    study_dir, victim = make_tree(tmp_path)
    copy = add_copy(study_dir, victim, "a_broken")
    data = bytearray(copy.read_bytes())
    data[140:1200] = b"\xff" * (1200 - 140)  # the dataset's first elements overwritten
    copy.write_bytes(bytes(data))
    study = load_study(study_dir)
    assert_complete(study, reference)
    (skip,) = study.skipped
    assert skip.reason in ("unreadable", "not_dicom") and skip.files == [f"a_broken/{victim.name}"]
