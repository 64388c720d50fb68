"""Heat maps on a real, oblique, anisotropic DICOM series, through the whole inference path
(ingestion, preprocessing to the model grid, model, heat map back onto the scan).

The model is the session's planted-lesion model (conftest.py: trained to find a bright box in
smooth texture on a 16x64x64 grid). The first test takes the real anatomy and checks that every
heat map has exactly the scan's geometry. The second keeps the real series' grid (274 x 384 x 48
voxels of 0.7 x 0.667 x 5.33 mm: the repository's excerpt, every 8th slice, slightly oblique) but fills it with the texture the model knows
(as CT values, so that the fixed HU window returns exactly those intensities) and plants a bright
box in the scan's OWN voxel grid: the map's maximum must come back on it.
"""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hlip_core.data import PreprocessSettings, Scan, Study, load_study
from hlip_core.inference import StudyPredictor
from planted import GRID, LESION
from realdata import real_mri_dicom_dir

PATCH = (4, 8, 8)  # the lesion model's patch (conftest.py)


@pytest.fixture(scope="module")
def real_scan():
    study = load_study(real_mri_dicom_dir())
    assert len(study.scans) == 1, study.skipped
    return study.scans[0]


@pytest.fixture(scope="module")
def predictor(lesion_model):
    predictor = StudyPredictor(lesion_model)  # default preprocessing, on the model's own grid
    assert predictor.settings == PreprocessSettings(target_shape=GRID)
    return predictor


def same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize(), a.GetOrigin(), a.GetSpacing(), a.GetDirection()) == (b.GetSize(), b.GetOrigin(), b.GetSpacing(), b.GetDirection())


def textured_like(image: sitk.Image, seed: int) -> np.ndarray:
    """Smooth random texture in 0.1..0.7 on the image's voxel grid ([k, j, i] array), as smooth
    as the planted-lesion training studies once resized to the model grid."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 1, 2, 8, 8), dtype=np.float32))
    return F.interpolate(coarse, size=image.GetSize()[::-1], mode="trilinear", align_corners=False)[0, 0].numpy() * 0.6 + 0.1


def ct_like(image: sitk.Image, texture: np.ndarray) -> Scan:
    """A CT scan on ``image``'s grid whose values, through the HU window (-1150..350), come back
    to the model grid as ``texture`` (0..1): the intensities the lesion model was trained on."""
    out = sitk.GetImageFromArray((-1150.0 + 1500.0 * texture).astype(np.float32))
    out.CopyInformation(image)
    return Scan(scan_id="", modality="CT", description="", image=out)


def study_of(**scans: Scan) -> Study:
    for name, scan in scans.items():
        scan.scan_id = name
    return Study(study_id="planted", scans=list(scans.values()))


def test_heat_maps_have_exactly_the_geometry_of_the_real_series(predictor, real_scan):
    image = real_scan.image
    assert image.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1) and len(set(image.GetSpacing())) > 1  # oblique, anisotropic
    result = predictor.predict([image, image], ["bright lesion", "no abnormality"], heatmaps=True)
    for finding, per_scan in result.all_heatmaps.items():
        for scan_id, heat in per_scan.items():
            assert same_geometry(heat, image), (finding, scan_id)
            assert heat.GetPixelID() == sitk.sitkFloat32
            values = sitk.GetArrayViewFromImage(heat)
            assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1 + 1e-6
    # the trained finding points somewhere; "no abnormality" may be supported by no patch at all
    # on anatomy the model has never seen (then its map is blank, which is an answer, not a fault)
    assert max(sitk.GetArrayViewFromImage(h).max() for h in result.all_heatmaps["bright lesion"].values()) > 0.5


def test_a_box_planted_in_the_scans_own_voxels_gets_the_maximum(predictor, real_scan):
    image = real_scan.image
    size = np.array(image.GetSize())  # (i, j, k): the model's (W, H, D), the scan being only slightly oblique
    box = np.ceil(np.array(LESION[::-1]) * size / np.array(GRID[::-1])).astype(int)  # the trained lesion size, in voxels
    patch = np.ceil(np.array(PATCH[::-1]) * size / np.array(GRID[::-1])).astype(int)  # the map's resolution, in voxels
    hits = 0
    for trial, where in enumerate([(0.2, 0.6, 0.3), (0.6, 0.2, 0.5), (0.45, 0.55, 0.7)]):
        lo = (size * np.array(where)).astype(int)
        hi = lo + box
        plain, lesion = textured_like(image, 2 * trial), textured_like(image, 2 * trial + 1)
        lesion[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = 1.0
        result = predictor.predict(study_of(plain=ct_like(image, plain), lesion=ct_like(image, lesion)), ["bright lesion"], heatmaps=True)
        without = predictor.predict(study_of(plain=ct_like(image, plain), other=ct_like(image, textured_like(image, 99))), ["bright lesion"])
        assert result.findings[0].scan_id == "lesion", "the scan with the box drives the finding"
        assert result.findings[0].probability > without.findings[0].probability
        heat = result.heatmaps["bright lesion"]
        assert same_geometry(heat, image)
        peak = np.array(np.unravel_index(int(np.argmax(sitk.GetArrayViewFromImage(heat))), heat.GetSize()[::-1])[::-1])
        hits += bool(np.all(peak >= lo - patch) and np.all(peak < hi + patch))
    assert hits >= 2, f"the heat-map maximum fell within one patch of the box in {hits} of 3 studies"
