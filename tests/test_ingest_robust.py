"""Uncurated input: a study folder holding what PACS exports hold (localisers, SR and secondary
capture objects, two series interleaved, gantry tilt, a missing slice, a truncated file, an
undecodable series, multi-frame objects, time series, foreign files). Every valid series must be
kept with SimpleITK's geometry; every other file and series must be reported with its reason."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from dicom_factory import (AXIAL, CORONAL, PATIENT_ID, PATIENT_NAME, read_sitk_series, rotation, truncate,
                           write_junk, write_localizer, write_multiframe, write_secondary_capture, write_series, write_sr,
                           write_undecodable)
from hlip_core.data import load_study
from test_ingest_load import assert_geometry_like_simpleitk


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """One study, everything in a single flat folder with random file names."""
    root = tmp_path_factory.mktemp("messy")
    folder = root / "export"
    uid = generate_uid()
    w = {}
    w["axial"] = write_series(folder, n=14, study_uid=uid, series_number=2, description="Head axial", shuffle=1)
    w["oblique"] = write_series(folder, n=12, study_uid=uid, series_number=3, description="Oblique MR", modality="MR",
                                intercept=0.0, axes=rotation(18, -9, 4), shuffle=2)
    w["tilt"] = write_series(folder, n=12, study_uid=uid, series_number=4, description="Tilted CT", tilt_deg=12.0, shuffle=3)
    w["gap"] = write_series(folder, n=13, study_uid=uid, series_number=5, description="One slice missing", drop=[6], shuffle=4)
    w["truncated"] = write_series(folder, n=12, study_uid=uid, series_number=6, description="Cut file", shuffle=5)
    cut_index = w["truncated"].extra["kept"].index(4)
    truncate(w["truncated"].files[cut_index], keep=0.7)
    w["derived"] = write_series(folder, n=10, study_uid=uid, series_number=7, description="MPR coronal", axes=CORONAL,
                                image_type=("DERIVED", "SECONDARY", "MPR"), shuffle=6)
    w["bold"] = write_series(folder, n=9, study_uid=uid, series_number=8, description="BOLD", modality="MR", intercept=0.0,
                             repeats=3, shuffle=7, instance_numbers="random")
    w["few"] = write_series(folder, n=3, study_uid=uid, series_number=9, description="Three slices", shuffle=8)
    w["random_positions"] = write_series(folder, n=10, study_uid=uid, series_number=10, description="Scattered", shuffle=9)
    _scatter_positions(w["random_positions"].files)
    w["enhanced"] = write_multiframe(folder / "enhanced_mr.dcm", n=10, study_uid=uid, series_number=11,
                                     axes=rotation(0, 12, 0), frame_order=[3, 9, 0, 5, 1, 8, 2, 7, 4, 6])
    w["localizer"] = write_localizer(folder, uid, series_number=1)
    sr = write_sr(folder / "sr_object", uid)
    sc = write_secondary_capture(folder / "screenshot", uid)
    broken = write_undecodable(folder, uid, series_number=12)
    junk = write_junk(folder / "export_log.txt")
    truncated_header = write_series(folder, n=1, study_uid=uid, series_number=13, description="header cut",
                                    name=lambda i: "cut_header").files[0]
    truncate(truncated_header, keep_bytes=400)  # inside the file meta / dataset header
    study = load_study(folder)
    return {"study": study, "written": w, "uid": uid, "sr": sr, "sc": sc, "broken": broken, "junk": junk,
            "cut_header": truncated_header, "folder": folder}


def _scatter_positions(files):
    import pydicom

    rng = np.random.default_rng(0)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in rng.uniform(-50, 50, size=3)]
        ds.save_as(f)


def scan_of(study, series_uid):
    found = [s for s in study.scans if s.scan_id == series_uid or s.scan_id.startswith(series_uid + "_")]
    assert found, f"series {series_uid} was not kept"
    return found


def reasons_of(study, uid=None, file=None):
    out = []
    for s in study.skipped:
        if (uid and s.uid == uid) or (file and any(str(f).endswith(file) for f in s.files)):
            out.append(s.reason)
    return out


def test_every_valid_series_is_kept_and_in_series_order(messy):
    study, w = messy["study"], messy["written"]
    assert study.study_id == messy["uid"]
    kept = [s.scan_id.split("_")[0] for s in study.scans]
    expected = [w[k].series_uid for k in ("axial", "oblique", "tilt", "gap", "truncated", "derived", "bold", "enhanced")]
    assert list(dict.fromkeys(kept)) == expected
    assert len(study.scans) == 7 + 3  # the time series is split into its 3 volumes


def test_interleaved_series_are_separated_and_match_simpleitk(messy):
    study, w = messy["study"], messy["written"]
    for key in ("axial", "oblique", "derived"):
        (scan,) = scan_of(study, w[key].series_uid)
        reference = read_sitk_series(w[key].files)
        assert_geometry_like_simpleitk(scan.image, reference)
        np.testing.assert_allclose(sitk.GetArrayFromImage(scan.image), w[key].volume, atol=1e-4)


def test_gantry_tilt_keeps_simpleitk_geometry_and_is_recorded(messy):
    (scan,) = scan_of(messy["study"], messy["written"]["tilt"].series_uid)
    assert_geometry_like_simpleitk(scan.image, read_sitk_series(messy["written"]["tilt"].files))
    assert scan.header["gantry_tilt_deg"] == pytest.approx(12.0, abs=0.01)


def test_a_missing_slice_is_filled_and_the_geometry_is_that_of_the_complete_series(messy, tmp_path):
    written = messy["written"]["gap"]
    (scan,) = scan_of(messy["study"], written.series_uid)
    # the same series written complete is what SimpleITK reads correctly (it reads the gapped one
    # with a wrong, stretched slice spacing)
    complete = write_series(tmp_path / "complete", n=13)
    assert_geometry_like_simpleitk(scan.image, read_sitk_series(complete.files))
    arr = sitk.GetArrayFromImage(scan.image)
    np.testing.assert_array_equal(arr[5], written.volume[5])
    np.testing.assert_array_equal(arr[6], np.rint((written.volume[5] + written.volume[7]) / 2))
    np.testing.assert_array_equal(arr[7], written.volume[7])
    assert scan.header["interpolated_slices"] == [6]


def test_a_file_cut_inside_its_pixels_is_reported_and_its_slice_filled(messy):
    written = messy["written"]["truncated"]
    cut = written.files[written.extra["kept"].index(4)]
    assert reasons_of(messy["study"], file=cut.name) == ["truncated"]
    (scan,) = scan_of(messy["study"], written.series_uid)
    assert scan.image.GetSize()[2] == 12 and scan.header["interpolated_slices"] == [4]
    assert str(cut) not in scan.files


def test_a_file_cut_inside_its_header_is_reported(messy):
    assert reasons_of(messy["study"], file="cut_header") == ["unreadable"]


def test_repeated_positions_become_one_volume_per_time_point(messy):
    written = messy["written"]["bold"]
    scans = scan_of(messy["study"], written.series_uid)
    assert [s.scan_id for s in scans] == [f"{written.series_uid}_{k}" for k in (1, 2, 3)]
    for t, scan in enumerate(scans):
        np.testing.assert_allclose(sitk.GetArrayFromImage(scan.image), written.volume[t * 9:(t + 1) * 9], atol=1e-4)
        assert scan.header["volume"].startswith(f"{t + 1}/3")
        assert scan.image.GetSize()[2] == 9


def test_repeated_positions_with_one_chosen_volume_report_the_others(messy):
    written = messy["written"]["bold"]
    study = load_study(written.files, repeated="last")
    (scan,) = study.scans
    np.testing.assert_allclose(sitk.GetArrayFromImage(scan.image), written.volume[18:27], atol=1e-4)
    (skip,) = study.skipped
    assert skip.reason == "volume_not_selected" and "kept volume(s) 3" in str(skip)


def test_a_multiframe_object_is_split_into_frames_in_position_order(messy, tmp_path):
    written = messy["written"]["enhanced"]
    (scan,) = scan_of(messy["study"], written.series_uid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), written.volume)
    # the same slices as single-frame files, read by SimpleITK, give the geometry
    single = write_series(tmp_path / "single", n=10, modality="MR", intercept=0.0, axes=rotation(0, 12, 0))
    assert_geometry_like_simpleitk(scan.image, read_sitk_series(single.files))

def test_a_multiframe_object_in_frame_order_reads_as_simpleitk_reads_it(tmp_path):
    # GDCM takes frames in stored order (it does not sort them), so compare on a file stored in order
    written = write_multiframe(tmp_path / "mf.dcm", n=10, axes=rotation(0, 12, 0), slope=2.0, intercept=-5.0)
    (scan,) = load_study([str(written.files[0])]).scans
    gdcm = sitk.ReadImage(str(written.files[0]))
    assert_geometry_like_simpleitk(scan.image, gdcm)
    np.testing.assert_allclose(sitk.GetArrayFromImage(scan.image), sitk.GetArrayFromImage(gdcm), atol=1e-4)


@pytest.mark.parametrize("key,reason", [("localizer", "localizer"), ("few", "too_few_slices"),
                                        ("random_positions", "inconsistent_spacing")])
def test_unusable_series_are_skipped_with_their_reason(messy, key, reason):
    assert reasons_of(messy["study"], uid=messy["written"][key].series_uid) == [reason]


def test_objects_without_volumes_are_skipped_with_their_reason(messy):
    study = messy["study"]
    assert reasons_of(study, file="sr_object") == ["not_image"]
    assert reasons_of(study, file="screenshot") == ["secondary_capture"]
    assert reasons_of(study, file="export_log.txt") == ["not_dicom"]
    assert set(reasons_of(study, file=messy["broken"][0].name)) == {"undecodable"}


def test_every_file_is_either_in_a_scan_or_reported(messy):
    study = messy["study"]
    used = {str(f) for s in study.scans for f in s.files}
    reported = {f for s in study.skipped for f in s.files}
    every = {p.name for p in messy["folder"].iterdir()}
    accounted = {p.split("/")[-1] for p in used} | {p.split("/")[-1] for p in reported}
    assert every == accounted


def test_skip_reasons_read_as_one_line_without_patient_data(messy):
    lines = [str(s) for s in messy["study"].skipped]
    assert any(line.startswith("series 1 'Scout' (") and line.endswith("localizer (ImageType LOCALIZER)") for line in lines)
    for line in lines:
        assert "\n" not in line
        assert PATIENT_NAME.split("^")[0] not in line and PATIENT_ID not in line


def test_derived_series_are_skipped_only_when_asked(messy):
    written = messy["written"]["derived"]
    assert load_study(written.files).scans
    study = load_study(written.files, keep_derived=False)
    assert study.scans == [] and study.skipped[0].reason == "derived"


def test_a_series_with_a_stray_slice_in_another_orientation_keeps_the_stack(tmp_path):
    uid, series = generate_uid(), generate_uid()
    stack = write_series(tmp_path / "m", n=10, study_uid=uid, series_uid=series)
    write_series(tmp_path / "m", n=1, study_uid=uid, series_uid=series, axes=CORONAL, name=lambda i: "stray")
    study = load_study(tmp_path / "m")
    (scan,) = study.scans
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), stack.volume)
    assert [s.reason for s in study.skipped] == ["mixed_orientation"]
    assert study.skipped[0].files[0].endswith("stray")


def test_a_series_of_mixed_orientations_with_no_stack_is_skipped(tmp_path):
    uid, series = generate_uid(), generate_uid()
    for i, axes in enumerate([AXIAL, CORONAL, rotation(0, 45, 0)]):
        write_series(tmp_path / "m", n=3, study_uid=uid, series_uid=series, axes=axes, name=lambda k, i=i: f"o{i}_{k}")
    study = load_study(tmp_path / "m")
    assert study.scans == [] and [s.reason for s in study.skipped] == ["mixed_orientation"]


def test_a_large_gap_skips_the_series_with_the_gap_named(tmp_path):
    written = write_series(tmp_path / "g", n=14, drop=[5, 6, 7])
    study = load_study(written.files)
    assert study.scans == []
    assert "3 missing slices after slice 5 (max_gap=2)" in str(study.skipped[0])
    assert load_study(written.files, max_gap=3).scans[0].image.GetSize()[2] == 14


def test_duplicate_copies_of_an_instance_are_reported_once(tmp_path):
    written = write_series(tmp_path / "d", n=9)
    copy = tmp_path / "d" / "copy_of_first"
    copy.write_bytes(written.files[0].read_bytes())
    study = load_study(tmp_path / "d")
    assert len(study.scans) == 1 and study.scans[0].image.GetSize()[2] == 9
    assert [s.reason for s in study.skipped] == ["duplicate"]


def test_diffusion_b_values_split_into_labelled_volumes(tmp_path):
    written = write_series(tmp_path / "dwi", n=8, modality="MR", intercept=0.0, repeats=2, repeat_tag="DiffusionBValue")
    scans = load_study(written.files).scans
    assert [s.header["volume"] for s in scans] == ["1/2", "2/2 b=500"]
    np.testing.assert_allclose(sitk.GetArrayFromImage(scans[1].image), written.volume[8:], atol=1e-4)


def test_an_empty_folder_is_a_study_without_scans(tmp_path):
    study = load_study(tmp_path)
    assert study.scans == [] and study.skipped == []


@pytest.mark.filterwarnings("ignore:The 'DicomDir' class is deprecated:DeprecationWarning")  # pydicom's FileSet.write
def test_a_dicomdir_export_is_read_from_its_files_and_the_index_reported(tmp_path):
    from pydicom.fileset import FileSet

    written = write_series(tmp_path / "flat", n=9, shuffle=3)
    fs = FileSet()
    for f in written.files:
        fs.add(str(f))
    fs.write(tmp_path / "media")  # DICOMDIR plus the images in PT000000/ST000000/... folders
    study = load_study(tmp_path / "media")
    (scan,) = study.scans
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), written.volume)
    assert [(s.reason, s.files) for s in study.skipped] == [("dicomdir", ["DICOMDIR"])]
