"""Model space and back: settings, canonical orientation, intensity normalisation, resizing, and
the return of model-grid maps onto the original scan geometry (real oblique MRI and synthetic)."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from dicom_factory import AXIAL, CORONAL, SAGITTAL, rotation, write_series
from hlip_core.data import PreprocessSettings, load_study, model_image, to_model_space, to_scan_space
from hlip_core.data.preprocess import canonical_axes, to_storage
from realdata import real_mri_dicom_dir


def make_image(size=(20, 16, 12), spacing=(0.9, 0.8, 2.5), direction=AXIAL, origin=(-10.0, 5.0, 30.0), seed=0):
    """A SimpleITK image with smooth random content (x = size[0] columns)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=size[::-1]).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img = sitk.SmoothingRecursiveGaussian(img, 1.0)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(np.asarray(direction, float).reshape(-1).tolist())
    return img


def physical_blob_image(reference: sitk.Image, centre_mm, radius_mm=6.0) -> sitk.Image:
    """reference's grid with 1 inside a ball around ``centre_mm`` (physical), 0 outside."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in reference.GetSize()], indexing="ij"), -1).reshape(-1, 3)
    d = np.asarray(reference.GetDirection()).reshape(3, 3)
    pts = np.asarray(reference.GetOrigin()) + (idx * np.asarray(reference.GetSpacing())) @ d.T
    inside = (np.linalg.norm(pts - np.asarray(centre_mm), axis=1) <= radius_mm).astype(np.float32)
    arr = inside.reshape(reference.GetSize()).transpose(2, 1, 0)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(reference)
    return out


def centroid_mm(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    k, j, i = np.nonzero(arr > 0)
    w = arr[k, j, i]
    idx = np.stack([i, j, k], 1)
    d = np.asarray(image.GetDirection()).reshape(3, 3)
    pts = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ d.T
    return (pts * w[:, None]).sum(0) / w.sum()


def assert_same_geometry(a: sitk.Image, b: sitk.Image):
    assert a.GetSize() == b.GetSize()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetDirection() == b.GetDirection()


# -- settings --------------------------------------------------------------------------------------


def test_settings_round_trip_through_json():
    s = PreprocessSettings(target_shape=(32, 64, 64), spacing=(2.0, 1.0, 1.0), ct_window=(-1000, 400), storage="float16")
    again = PreprocessSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert again.target_shape == (32, 64, 64) and isinstance(again.target_shape, tuple)


def test_settings_from_an_older_dict_take_defaults_and_ignore_unknown_keys(caplog):
    with caplog.at_level(logging.WARNING):
        s = PreprocessSettings.from_dict({"target_shape": [16, 32, 32], "mri_percentiles": [1, 99], "added_later": 3})
    assert s.target_shape == (16, 32, 32)
    assert s.percentiles == (1.0, 99.0)
    assert s.ct_window == (-1150.0, 350.0) and s.orientation == "LPS" and s.storage == "uint8"
    assert "added_later" in caplog.text
    assert PreprocessSettings.from_dict({}) == PreprocessSettings()


@pytest.mark.parametrize("bad", [dict(target_shape=(0, 4, 4)), dict(ct_window=(350, -1150)), dict(percentiles=(99, 1)),
                                 dict(orientation="LPX"), dict(orientation="LLS"), dict(storage="int8"), dict(spacing=(1, 1))])
def test_settings_reject_bad_values_with_a_clear_message(bad):
    with pytest.raises(ValueError):
        PreprocessSettings(**bad)


# -- orientation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [AXIAL, CORONAL, SAGITTAL, -AXIAL, np.diag([1.0, -1.0, -1.0]), rotation(25, -10, 30),
                                       rotation(0, 0, 44), np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]])])
def test_canonical_orientation_is_what_simpleitk_dicomorient_lps_gives(direction):
    img = make_image(direction=direction)
    reference = sitk.DICOMOrient(img, "LPS")
    target = tuple(reference.GetSize()[::-1])
    settings = PreprocessSettings(target_shape=target, ct_window=(-5, 5), antialias=False)
    array, transform = to_model_space(img, "CT", settings)
    expected = np.clip((sitk.GetArrayFromImage(reference) + 5) / 10, 0, 1)
    np.testing.assert_allclose(array, expected, atol=1e-6)
    g = transform["model_geometry"]
    np.testing.assert_allclose(g["origin"], reference.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(g["spacing"], reference.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(g["direction"], reference.GetDirection(), atol=1e-12)


def test_canonical_axes_keep_an_axial_series_and_permute_and_flip_a_sagittal_one():
    source_of, flips = canonical_axes((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert source_of == [0, 1, 2] and flips == [False, False, False]
    source_of, flips = canonical_axes((0, 0, -1, 1, 0, 0, 0, -1, 0))  # sagittal DICOM: rows along P, columns to I
    assert source_of == [2, 0, 1] and flips == [True, False, True]


# -- intensities ---------------------------------------------------------------------------------


def test_ct_window_maps_hounsfield_units_linearly_and_clips():
    arr = np.array([-2000, -1150, -400, 350, 3000], np.float32)
    img = sitk.GetImageFromArray(np.broadcast_to(arr, (5, 5, 5)).copy())
    out, transform = to_model_space(img, "CT", PreprocessSettings(target_shape=(5, 5, 5), antialias=False))
    np.testing.assert_allclose(out[0, 0], [0, 0, 0.5, 1, 1], atol=1e-6)
    assert transform["value_range"] == [-1150.0, 350.0]
    custom = PreprocessSettings(target_shape=(5, 5, 5), ct_window=(-400, 350), antialias=False)
    np.testing.assert_allclose(to_model_space(img, "CT", custom)[0][0, 0], [0, 0, 0, 1, 1], atol=1e-6)


def test_mri_is_clipped_at_its_own_percentiles():
    rng = np.random.default_rng(1)
    arr = rng.uniform(0, 1000, size=(20, 20, 20)).astype(np.float32)
    arr[0, 0, :5] = 1e6  # a few hot voxels must not set the scale
    img = sitk.GetImageFromArray(arr)
    out, transform = to_model_space(img, "MR", PreprocessSettings(target_shape=(20, 20, 20), antialias=False))
    lo, hi = np.percentile(arr, [0.5, 99.5])
    np.testing.assert_allclose(transform["value_range"], [lo, hi], rtol=1e-6)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[5, 5, 5], np.clip((arr[5, 5, 5] - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_storage_uint8_and_float16_keep_the_unit_range():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    assert to_storage(x, "uint8").tolist() == [0, 26, 51, 76, 102, 128, 153, 178, 204, 230, 255]
    assert to_storage(x, "float16").dtype == np.float16


# -- model grid and back ---------------------------------------------------------------------------


def test_model_array_has_the_target_shape_and_unit_range():
    img = make_image(size=(40, 30, 9))
    out, transform = to_model_space(img, "MR", PreprocessSettings(target_shape=(8, 16, 24)))
    assert out.shape == (8, 16, 24) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    json.dumps(transform)  # JSON-able as it is


def test_maps_return_with_exactly_the_original_geometry():
    img = make_image(size=(40, 30, 9), direction=rotation(12, -7, 20), spacing=(0.7, 0.7, 3.3))
    _, transform = to_model_space(img, "MR", PreprocessSettings(target_shape=(8, 16, 24)))
    transform = json.loads(json.dumps(transform))  # as stored in a sidecar
    heat = to_scan_space(np.random.default_rng(0).random((8, 16, 24), dtype=np.float32), transform)
    assert_same_geometry(heat, img)
    assert heat.GetPixelID() == sitk.sitkFloat32


def test_without_resizing_the_round_trip_is_the_identity():
    img = make_image(direction=SAGITTAL)
    reference = sitk.DICOMOrient(img, "LPS")
    settings = PreprocessSettings(target_shape=tuple(reference.GetSize()[::-1]), ct_window=(-5, 5), antialias=False)
    array, transform = to_model_space(img, "CT", settings)
    back = to_scan_space(array, transform)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), np.clip((sitk.GetArrayFromImage(img) + 5) / 10, 0, 1), atol=1e-6)


def test_a_map_is_a_function_of_position_so_it_lands_where_it_was_made():
    """A model-grid map that is a linear function of the physical position comes back as the same
    function of the original voxel positions (away from the borders, where interpolation clamps)."""
    img = make_image(size=(48, 40, 14), direction=rotation(15, 20, -30), spacing=(0.6, 0.6, 2.7), origin=(3, -7, 11))
    settings = PreprocessSettings(target_shape=(12, 20, 24))
    _, transform = to_model_space(img, "MR", settings)
    grid = model_image(np.zeros(settings.target_shape, np.float32), transform)
    coef = np.array([0.3, -0.2, 0.5])

    def field(image):
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in image.GetSize()], indexing="ij"), -1)
        d = np.asarray(image.GetDirection()).reshape(3, 3)
        pts = np.asarray(image.GetOrigin()) + (idx * np.asarray(image.GetSpacing())) @ d.T
        return (pts @ coef).transpose(2, 1, 0)

    heat = to_scan_space(field(grid).astype(np.float32), transform)
    got = sitk.GetArrayFromImage(heat)
    want = field(img)
    inner = (slice(3, -3), slice(8, -8), slice(8, -8))
    np.testing.assert_allclose(got[inner], want[inner], atol=1e-3)


def test_spacing_mode_crops_the_centre_and_leaves_zeros_outside():
    img = make_image(size=(60, 60, 20), spacing=(1.0, 1.0, 2.0))
    settings = PreprocessSettings(target_shape=(10, 40, 40), spacing=(2.0, 1.0, 1.0), antialias=False)
    array, transform = to_model_space(img, "MR", settings)
    assert transform["resampled_shape"] == [20, 60, 60] and transform["offset"] == [5, 10, 10]
    heat = sitk.GetArrayFromImage(to_scan_space(np.ones(settings.target_shape, np.float32), transform))
    assert heat.shape == (20, 60, 60)
    assert heat[10, 30, 30] == pytest.approx(1.0) and heat[0, 0, 0] == 0.0 and heat[10, 5, 30] == 0.0
    assert heat[5:15, 10:50, 10:50].min() == pytest.approx(1.0)


def test_wrong_map_shape_is_refused():
    img = make_image()
    _, transform = to_model_space(img, "MR", PreprocessSettings(target_shape=(4, 8, 8)))
    with pytest.raises(ValueError, match="model grid"):
        to_scan_space(np.zeros((4, 8, 9), np.float32), transform)


def test_heat_map_round_trip_on_the_real_oblique_anisotropic_mri():
    study = load_study(real_mri_dicom_dir())
    scan = study.scans[0]
    img = scan.image
    assert abs(np.asarray(img.GetDirection()).reshape(3, 3) - np.eye(3)).max() > 0.1  # really oblique
    settings = PreprocessSettings(target_shape=(32, 64, 64))
    array, transform = to_model_space(img, scan.modality, settings)
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([100, 150, 30]))
    blob = physical_blob_image(model_image(array, transform), centre, radius_mm=12.0)
    heat = to_scan_space(sitk.GetArrayFromImage(blob), transform)
    assert_same_geometry(heat, img)
    # the blob made on the model grid comes back around the same physical point
    assert np.linalg.norm(centroid_mm(heat) - centre) < 2.0
    arr = sitk.GetArrayFromImage(heat)
    assert arr.max() > 0.9 and arr.min() == 0.0


def test_heat_map_round_trip_on_a_synthetic_oblique_dicom_series(tmp_path):
    written = write_series(tmp_path / "s", n=24, rows=40, cols=36, pixel_spacing=(0.55, 0.6), step=3.2,
                           axes=rotation(28, -17, 9), modality="MR", intercept=0.0)
    scan = load_study(tmp_path / "s").scans[0]
    settings = PreprocessSettings(target_shape=(16, 32, 32))
    array, transform = to_model_space(scan.image, scan.modality, settings)
    centre = np.asarray(scan.image.TransformContinuousIndexToPhysicalPoint([18, 20, 12]))
    blob = physical_blob_image(model_image(array, transform), centre, radius_mm=6.0)
    heat = to_scan_space(sitk.GetArrayFromImage(blob), transform)
    assert_same_geometry(heat, scan.image)
    assert np.linalg.norm(centroid_mm(heat) - centre) < 1.5
    assert written.series_uid == scan.scan_id


def test_the_separable_resize_equals_gaussian_smoothing_then_torch_trilinear():
    """The fast path (one matrix per axis) is the textbook pipeline: scipy's Gaussian on shrunk axes
    (sigma = (factor - 1) / 2) followed by torch's trilinear resize with align_corners=False."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    rng = np.random.default_rng(5)
    arr = rng.random((40, 23, 17)).astype(np.float32)  # shrink, shrink, grow
    img = sitk.GetImageFromArray(arr)
    target = (9, 12, 30)
    got, _ = to_model_space(img, "CT", PreprocessSettings(target_shape=target, ct_window=(0, 1)))
    ref = arr
    for axis, (n, t) in enumerate(zip(arr.shape, target)):
        if n > t:
            ref = ndimage.gaussian_filter1d(ref, (n / t - 1) / 2, axis=axis, mode="nearest", truncate=3.0)
    ref = F.interpolate(torch.from_numpy(np.ascontiguousarray(ref))[None, None], size=target, mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-6)
