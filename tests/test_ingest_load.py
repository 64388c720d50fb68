"""load_study on ordinary inputs: DICOM series in any file order and orientation (checked voxel by
voxel and against SimpleITK's geometry), the real MRI series, NIfTI/NRRD/MHA folders and files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import AXIAL, CORONAL, SAGITTAL, read_sitk_series, rotation, write_series
from hlip_core.data import Scan, Study, load_study
from realdata import MRI_EXCERPT_SLICES, real_mri_dicom_dir


def assert_geometry_like_simpleitk(image: sitk.Image, reference: sitk.Image):
    """The issue's bar: origin and spacing to 1e-4 mm, direction to 1e-6."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", [
    dict(),
    dict(axes=rotation(20, 10, 5)),
    dict(axes=SAGITTAL, modality="MR", intercept=0.0),
    dict(axes=CORONAL, step=-1.5),
    dict(axes=rotation(-35, 0, 60), pixel_spacing=(0.43, 0.57), step=3.1),
    dict(slope=0.25, intercept=-7.5),
    dict(signed=True, intercept=0.0),
], ids=["axial", "oblique", "sagittal", "coronal-descending", "oblique-anisotropic", "float-rescale", "signed"])
def test_a_series_in_shuffled_files_is_assembled_like_simpleitk_reads_it(tmp_path, case):
    written = write_series(tmp_path / "study", n=11, shuffle=7, instance_numbers="random", **case)
    study = load_study(tmp_path / "study")
    assert isinstance(study, Study) and study.skipped == []
    (scan,) = study.scans
    assert isinstance(scan, Scan)
    reference = read_sitk_series(written.files)
    assert_geometry_like_simpleitk(scan.image, reference)
    got = sitk.GetArrayFromImage(scan.image)
    expected = written.volume if case.get("step", 2.0) > 0 else written.volume[::-1]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    np.testing.assert_allclose(got, sitk.GetArrayFromImage(reference), atol=1e-4)
    assert scan.scan_id == written.series_uid
    assert study.study_id == written.study_uid
    assert sorted(scan.files) == sorted(str(f) for f in written.files)


def test_slices_are_ordered_by_position_not_by_instance_number_or_name(tmp_path):
    # names and instance numbers both run against the anatomy
    written = write_series(tmp_path / "s", n=9, shuffle=None, instance_numbers="descending",
                           name=lambda i: f"IM{99 - i:03d}.dcm")
    scan = load_study(tmp_path / "s").scans[0]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), written.volume)
    np.testing.assert_allclose(scan.image.GetOrigin(), written.origin)


def test_ct_values_are_in_hounsfield_units_and_kept_integer(tmp_path):
    written = write_series(tmp_path / "ct", n=8, intercept=-1024.0)
    scan = load_study(tmp_path / "ct").scans[0]
    assert scan.image.GetPixelID() == sitk.sitkInt16
    assert scan.modality == "CT"
    assert sitk.GetArrayViewFromImage(scan.image).min() == written.volume.min()


def test_header_facts_describe_the_scan_without_patient_data(tmp_path):
    write_series(tmp_path / "mr", n=8, modality="MR", intercept=0.0, description="T1 MPRAGE")
    scan = load_study(tmp_path / "mr").scans[0]
    assert scan.description == "T1 MPRAGE"
    assert scan.header["repetition_time"] == 2300.0 and scan.header["echo_time"] == 2.98
    assert scan.header["series_number"] == 1 and scan.header["slices"] == 8
    text = repr(scan.header)
    assert "Quorabelle" not in text and "PID-7Q4X9Z" not in text and "19231107" not in text


def test_the_real_mri_series_is_kept_with_simpleitk_geometry():
    folder = real_mri_dicom_dir()
    study = load_study(folder)
    assert study.skipped == []
    (scan,) = study.scans
    # ImageType DERIVED\SECONDARY: a real scan rebuilt from NIfTI, kept by default
    assert scan.header["image_type"] == ["DERIVED", "SECONDARY"]
    assert scan.modality == "MR" and scan.description == "anat-T1w"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    reference = reader.Execute()
    assert scan.image.GetSize() == (274, 384, MRI_EXCERPT_SLICES)
    assert_geometry_like_simpleitk(scan.image, reference)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(scan.image), sitk.GetArrayViewFromImage(reference))


def test_the_real_mri_from_a_shuffled_list_of_files_is_the_same_volume():
    folder = real_mri_dicom_dir()
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    np.random.default_rng(3).shuffle(files)
    a = load_study(files).scans[0].image
    b = load_study(folder).scans[0].image
    assert a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing()
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))


def test_the_same_series_loaded_with_an_explicit_study_id(tmp_path):
    write_series(tmp_path / "x", n=8)
    assert load_study(tmp_path / "x", study_id="mine").study_id == "mine"


def test_two_studies_in_one_source_are_refused_with_the_count(tmp_path):
    write_series(tmp_path / "mix", n=8)
    write_series(tmp_path / "mix", n=8)
    with pytest.raises(ValueError, match="2 different StudyInstanceUIDs"):
        load_study(tmp_path / "mix")


def test_unknown_options_are_refused():
    with pytest.raises(TypeError, match="min_slice"):
        load_study(real_mri_dicom_dir(), min_slice=3)


# -- volume files ---------------------------------------------------------------------------------


def write_volume(path, size=(20, 18, 12), direction=AXIAL, spacing=(0.9, 0.8, 2.0), origin=(1.0, 2.0, 3.0), seed=0):
    arr = np.random.default_rng(seed).integers(0, 1000, size=size[::-1]).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, float).reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def test_a_folder_of_volume_files_is_one_study_with_one_scan_per_file(tmp_path):
    folder = tmp_path / "BraTS_00001"
    made = {
        "BraTS_00001_t1": write_volume(folder / "BraTS_00001_t1.nii.gz", seed=1),
        "BraTS_00001_flair": write_volume(folder / "BraTS_00001_flair.nrrd", direction=rotation(10, 5, 0), seed=2),
        "BraTS_00001_t2": write_volume(folder / "BraTS_00001_t2.mha", direction=SAGITTAL, seed=3),
    }
    study = load_study(folder)
    assert study.study_id == "BraTS_00001"
    assert [s.scan_id for s in study.scans] == sorted(made)  # stable order: by name
    for scan in study.scans:
        ref = made[scan.scan_id]
        assert scan.modality == "MR" and scan.description == scan.scan_id
        np.testing.assert_allclose(scan.image.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(scan.image.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(scan.image.GetDirection(), ref.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(scan.image), sitk.GetArrayViewFromImage(ref))


def test_volume_files_given_as_a_list_and_their_modality_by_option(tmp_path):
    a = tmp_path / "p" / "ct_head.nii"
    write_volume(a)
    study = load_study([str(a)], volume_modality="CT")
    assert [s.scan_id for s in study.scans] == ["ct_head"] and study.scans[0].modality == "CT"
    assert study.study_id == "p"


def test_a_four_dimensional_volume_is_split_into_volumes(tmp_path):
    vols = [sitk.GetImageFromArray(np.full((10, 6, 5), t, np.float32)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(vols), str(tmp_path / "bold.nii.gz"))
    study = load_study(tmp_path)
    assert [s.scan_id for s in study.scans] == ["bold_1", "bold_2", "bold_3"]
    assert [float(sitk.GetArrayViewFromImage(s.image).mean()) for s in study.scans] == [0.0, 1.0, 2.0]
    first = load_study(tmp_path, repeated="first")
    assert [s.scan_id for s in first.scans] == ["bold"]
    assert "kept 1" in str(first.skipped[0])


# -- the fast header reader ------------------------------------------------------------------------


def _pydicom_test_files() -> list[str]:
    import pydicom

    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
             "MR_small_RLE.dcm", "JPEG2000.dcm", "MR_small_jp2klossless.dcm", "rtstruct.dcm", "test-SR.dcm",
             "liver_1frame.dcm", "nested_priv_SQ.dcm", "priv_SQ.dcm", "no_meta.dcm", "image_dfl.dcm", "rtdose.dcm"]
    return [str(folder / n) for n in names if (folder / n).is_file()]


def test_the_fast_header_reader_agrees_with_pydicom(tmp_path):
    """Every header fact from the struct reader equals pydicom's reading of the same file: real
    files in many encodings (pydicom's own test files, the real MRI) and the test series."""
    from hlip_core.data.dicom import HeaderError, read_header

    files = _pydicom_test_files() + [str(sorted(real_mri_dicom_dir().iterdir())[0])]
    files += [str(write_series(tmp_path / "e", n=1, modality="MR").files[0]),
              str(write_series(tmp_path / "i", n=1, transfer_syntax=pydicom_implicit()).files[0])]
    assert len(files) >= 12
    compared = 0
    for f in files:
        try:
            slow = read_header(f, fast=False)
        except HeaderError as exc:
            with pytest.raises(HeaderError) as fast_exc:
                read_header(f)
            assert fast_exc.value.reason == exc.reason, f
            continue
        fast = read_header(f)
        assert fast == slow, f
        compared += 1
    assert compared >= 10


def pydicom_implicit():
    from pydicom.uid import ImplicitVRLittleEndian

    return ImplicitVRLittleEndian


def test_the_fast_reader_skips_sequences_of_undefined_length(tmp_path):
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from hlip_core.data.dicom import read_header

    written = write_series(tmp_path / "s", n=1)
    ds = pydicom.dcmread(written.files[0])
    inner = Dataset()
    inner.CodeValue = "X"
    inner.add_new(0x00091010, "SQ", Sequence([Dataset()]))  # a nested private sequence
    ds.add_new(0x00091001, "SQ", Sequence([inner, Dataset()]))
    ds[0x00091001].is_undefined_length = True
    ds.save_as(written.files[0], write_like_original=False)
    fast, slow = read_header(str(written.files[0])), read_header(str(written.files[0]), fast=False)
    assert fast == slow and fast.pixel_state == "native"
    scan = load_study(written.files, min_slices=1).scans[0]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), written.volume)


def test_volume_modality_auto_tells_ct_from_mr_by_intensities(tmp_path):
    ct = sitk.GetImageFromArray(np.full((10, 8, 8), -1000, np.int16))
    ct[2, 2, 2] = 400
    mr = sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 900, (10, 8, 8)).astype(np.int16))
    sitk.WriteImage(ct, str(tmp_path / "head_ct.nii.gz"))
    sitk.WriteImage(mr, str(tmp_path / "t2.nii.gz"))
    study = load_study(tmp_path, volume_modality="auto")
    assert {s.scan_id: s.modality for s in study.scans} == {"head_ct": "CT", "t2": "MR"}


@pytest.mark.parametrize("top,dtype", [(4095, sitk.sitkInt16), (60000, sitk.sitkInt32)])
def test_rescaled_values_get_the_smallest_integer_type_that_holds_them(tmp_path, top, dtype):
    values = np.random.default_rng(0).integers(0, top + 1, size=(9, 16, 20))
    values[0, 0, 0] = top
    written = write_series(tmp_path / "v", n=9, values=values, intercept=-1024.0)
    scan = load_study(written.files).scans[0]
    assert scan.image.GetPixelID() == dtype
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.image), values - 1024)
