"""The released HLIP models' preprocessing preset: settings, the pipeline against a plain
restatement of the released steps in torch, and heat maps back onto the right voxels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from dicom_factory import rotation
from hlip_core.data import PreprocessSettings, model_image, to_model_space, to_scan_space
from hlip_core.data.preprocess import RELEASED
from test_preprocess import centroid_mm, make_image, physical_blob_image


def released_reference(canonical: np.ndarray, lo: float, hi: float, grid=(48, 224, 224)) -> np.ndarray:
    """The released steps as written down in issue 19: the scan in [0, 1] by (lo, hi), as uint8,
    / 255; zero-padded to a square in plane (the extra split half before, half after); bilinear to
    256 x 256 (8/7 of the grid) in plane; nearest-exact to the grid's depth; the centre cropped."""
    unit = (canonical.astype(np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))  # in float32, as stored scans are
    u8 = np.rint(np.clip(unit, 0, 1) * np.float32(255)).astype(np.uint8)
    img = torch.from_numpy(u8)[None].float() / 255.0  # [1, d, h, w]
    _, _, h, w = img.shape
    size = max(h, w)
    left, top = (size - w) // 2, (size - h) // 2
    img = F.pad(img, (left, size - w - left, top, size - h - top))
    side = round(grid[1] * 256 / 224)
    img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
    img = F.interpolate(img[None], size=(grid[0], side, side), mode="nearest-exact")[0]
    c = (side - grid[1]) // 2
    return img[0, :, c : c + grid[1], c : c + grid[2]].numpy()


def test_a_partial_dict_naming_the_released_preset_gives_the_full_released_settings():
    s = PreprocessSettings.from_dict({"preset": "released"})
    assert s.preset == "released" and s.target_shape == (48, 224, 224) and s.orientation == "RPI"
    assert (s.percentiles, s.ct_window, s.antialias, s.spacing) == ((0.5, 99.5), (-1150.0, 350.0), False, None)
    assert PreprocessSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert PreprocessSettings.from_dict({"preset": "released", "target_shape": [24, 112, 112]}).target_shape == (24, 112, 112)
    assert PreprocessSettings.from_dict({}).preset == "hlip_core" == PreprocessSettings().preset
    assert set(RELEASED) < set(s.to_dict())


@pytest.mark.parametrize("bad, match", [({"preset": "june"}, "preset must be one of"),
                                        ({"preset": "released", "spacing": [1, 1, 1]}, "spacing=None"),
                                        ({"preset": "released", "antialias": True}, "antialias=False")])
def test_bad_released_settings_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        PreprocessSettings.from_dict(bad)


@pytest.mark.parametrize("modality, size", [("MR", (120, 200, 37)), ("CT", (200, 120, 61))])
def test_the_released_pipeline_equals_the_plain_torch_steps(modality, size):
    img = make_image(size=size, spacing=(0.8, 0.8, 4.0), seed=3)
    if modality == "CT":
        img = img * 900.0 - 300.0
    settings = PreprocessSettings.from_dict({"preset": "released"})
    array, transform = to_model_space(img, modality, settings)
    canonical = sitk.GetArrayFromImage(sitk.DICOMOrient(img, "RPI")).astype(np.float64)
    if modality == "CT":
        lo, hi = settings.ct_window
    else:
        lo, hi = np.percentile(canonical.reshape(-1), settings.percentiles)
    assert transform["value_range"] == pytest.approx([lo, hi], rel=1e-5)
    want = released_reference(canonical, lo, hi)
    assert array.shape == want.shape == (48, 224, 224)
    np.testing.assert_allclose(array, want, atol=1e-6)
    # not trivially equal: the padding, the crop and the uint8 steps are all visible
    padded = (slice(None), slice(0, 20)) if size[1] < size[0] else (slice(None), slice(None), slice(0, 20))
    assert want[padded].max() == 0 and want.std() > 0.05


def test_released_heat_maps_land_on_the_voxels_they_were_made_on():
    img = make_image(size=(70, 52, 19), direction=rotation(14, -9, 21), spacing=(0.7, 0.9, 3.1), origin=(4, -6, 9))
    settings = PreprocessSettings.from_dict({"preset": "released", "target_shape": [16, 56, 56]})
    array, transform = to_model_space(img, "MR", settings)
    transform = json.loads(json.dumps(transform))
    assert transform["pad"][1] > 0  # the scan was padded to a square in plane
    for index in ([35, 26, 9], [20, 15, 5], [50, 38, 13]):
        centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint(index))
        blob = physical_blob_image(model_image(array, transform), centre, radius_mm=5.0)
        assert sitk.GetArrayFromImage(blob).sum() > 0
        heat = to_scan_space(sitk.GetArrayFromImage(blob), transform)
        assert heat.GetSize() == img.GetSize() and heat.GetDirection() == img.GetDirection()
        assert np.linalg.norm(centroid_mm(heat) - centre) < 1.5  # under one model voxel (1.25 x 1.25 x 3.7 mm)
