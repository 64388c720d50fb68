"""One DICOM recognition (hlip_core.data.looks_like_dicom) for prepare/load_study, the server's
uploads and its folder/DICOMweb datastores: real files with and without the 128-byte preamble are
DICOM, a non-DICOM file named .dcm and an empty file are not, with the same error everywhere."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from hlip_core.data import NOT_DICOM, load_study, looks_like_dicom, require_dicom
from hlip_core.data.dicom import HeaderError
from realdata import real_mri_dicom_dir


def _without_preamble(src: Path, dst: Path) -> None:
    """The file from its meta group on (no preamble, no 'DICM'): pydicom needs force=True."""
    dst.write_bytes(src.read_bytes()[132:])


def _without_meta(src: Path, dst: Path) -> None:
    """The bare dataset (first element in group 0008), as very old exports write it."""
    data = src.read_bytes()
    meta_length = int.from_bytes(data[140:144], "little")  # (0002,0000) UL group length, explicit VR
    dst.write_bytes(data[144 + meta_length:])


@pytest.fixture
def variants(tmp_path):
    src = sorted(real_mri_dicom_dir().glob("*.dcm"))
    folders = {}
    for name, write in [("part10", shutil.copyfile), ("no_preamble", _without_preamble), ("no_meta", _without_meta)]:
        folder = tmp_path / name
        folder.mkdir()
        for f in src:
            write(f, folder / f.name)
        folders[name] = folder
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.dcm").write_text("export log: 48 files\n")
    (junk / "empty.dcm").write_bytes(b"")
    folders["junk"] = junk
    return folders


def test_files_with_and_without_preamble_are_dicom_and_read_alike(variants):
    pydicom_needs_force = variants["no_preamble"] / "N2D_0001.dcm"
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(pydicom_needs_force)
    assert pydicom.dcmread(pydicom_needs_force, force=True).SeriesInstanceUID
    arrays = {}
    for name in ("part10", "no_preamble", "no_meta"):
        assert all(looks_like_dicom(f) for f in variants[name].iterdir())
        study = load_study(variants[name])
        assert study.skipped == [] and len(study.scans) == 1
        arrays[name] = sitk.GetArrayFromImage(study.scans[0].image)
    np.testing.assert_array_equal(arrays["no_preamble"], arrays["part10"])
    np.testing.assert_array_equal(arrays["no_meta"], arrays["part10"])


def test_a_non_dicom_file_gets_the_same_named_error_everywhere(variants, tmp_path):
    from monailabel_app.lib.routes import _unusable_reason

    for f in variants["junk"].iterdir():
        assert not looks_like_dicom(f)
        with pytest.raises(HeaderError) as err:
            require_dicom(f)
        assert (err.value.reason, err.value.detail) == ("not_dicom", NOT_DICOM)
        assert NOT_DICOM in _unusable_reason(str(f))  # the server's upload check
    assert not looks_like_dicom(tmp_path / "absent.dcm")
    study = load_study(variants["junk"])
    assert sorted((s.reason, s.detail, s.files[0]) for s in study.skipped) == [
        ("not_dicom", NOT_DICOM, "empty.dcm"), ("not_dicom", NOT_DICOM, "notes.dcm")]
    for name in ("part10", "no_preamble", "no_meta"):
        assert _unusable_reason(str(variants[name] / "N2D_0001.dcm")) is None


def test_the_folder_datastore_lists_a_series_without_preamble(variants, tmp_path):
    from monailabel_app.lib.datastore.folder import StudyFolderDatastore

    root = tmp_path / "studies"
    shutil.copytree(variants["no_preamble"], root / "studyA")
    shutil.copytree(variants["junk"], root / "studyA" / "junk")
    store = StudyFolderDatastore(str(root), tmp_path / "cache")
    store.refresh()
    (study,) = store.catalog.studies().values()
    assert len(study.scans) == 1
    assert len(store.study_files(study)) == len(list(variants["no_preamble"].iterdir()))
