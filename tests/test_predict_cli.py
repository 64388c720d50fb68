"""train/predict.py: one study in, a findings table, findings.json and heat maps in each scan's geometry out."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

import hlip_core
from planted import GRID, LESION

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "train"))
import predict as predict_cli  # noqa: E402

SIZE = (72, 80, 24)  # (i, j, k) voxels of each scan


@pytest.fixture(scope="module")
def checkpoint(lesion_model, tmp_path_factory):
    return hlip_core.save(lesion_model, tmp_path_factory.mktemp("ckpt") / "lesion")


def ct_scan(path: Path, seed: int, box: bool) -> sitk.Image:
    """A CT volume whose HU window gives the lesion model's texture (and box), in an oblique,
    anisotropic geometry."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 1, 2, 8, 8), dtype=np.float32))
    x = F.interpolate(coarse, size=SIZE[::-1], mode="trilinear", align_corners=False)[0, 0].numpy() * 0.6 + 0.1
    if box:
        k, j, i = (np.array(LESION) * np.array(SIZE[::-1]) / np.array(GRID)).astype(int)
        x[8 : 8 + k, 30 : 30 + j, 20 : 20 + i] = 1.0
    image = sitk.GetImageFromArray((-1150 + 1500 * x).astype(np.int16))
    image.SetSpacing((0.8, 0.75, 2.5))
    image.SetOrigin((-30.0, 12.0, -40.0))
    c, s = np.cos(0.2), np.sin(0.2)
    image.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path))
    return image


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "patient-visit"
    folder.mkdir()
    images = {"a_plain": ct_scan(folder / "a_plain.nii.gz", 1, False), "b_lesion": ct_scan(folder / "b_lesion.nii.gz", 2, True)}
    (folder / "notes.txt").write_text("not an image")
    return folder, images


def test_findings_table_json_and_heat_maps_in_the_scans_geometry(checkpoint, study, tmp_path, capsys):
    folder, images = study
    out = tmp_path / "answers"
    assert predict_cli.main(["--checkpoint", str(checkpoint), "--study", str(folder), "--findings", "bright lesion",
                             "no abnormality", "--heatmaps", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bright lesion" in printed and "2 scans used, 1 files or series not used" in printed
    answer = json.loads((out / "findings.json").read_text())
    row = answer["findings"][0]
    assert row["finding"] == "bright lesion" and row["scan_id"] == "b_lesion" and row["scan_modality"] == "CT"
    heat = sitk.ReadImage(str(out / row["heatmaps"]["b_lesion"]))
    ref = images["b_lesion"]
    assert heat.GetSize() == ref.GetSize()
    np.testing.assert_allclose(heat.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(heat.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(heat.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert (out / row["png"]).read_bytes()[:4] == b"\x89PNG"
    assert "notes.txt" in " ".join(answer["skipped"])


def test_bad_input_is_one_line_without_a_traceback(checkpoint, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    run = subprocess.run([sys.executable, str(REPO / "train" / "predict.py"), "--checkpoint", str(checkpoint), "--study", str(empty),
                          "--findings", "mass"], capture_output=True, text=True)
    assert run.returncode != 0
    assert "predict: study" in run.stderr and "has no usable scan" in run.stderr and "Traceback" not in run.stderr
    with pytest.raises(ValueError, match="finding 1 is empty"):
        predict_cli.main(["--checkpoint", str(checkpoint), "--study", str(empty), "--findings", "mass", " "])


def test_a_released_folder_is_a_checkpoint_prepared_with_its_released_preset(study, tmp_path, capsys):
    from hlip_core.inference import StudyPredictor
    from released_factory import TRAP_MARKER, write_released_folder

    folder, _ = study
    released = tmp_path / "hlip-released"
    writer = write_released_folder(released, "tiny_multiscan_h2_dualdinotxt")
    out = tmp_path / "answers"
    findings = ["intracranial haemorrhage", "mass effect"]
    assert predict_cli.main(["--checkpoint", str(released), "--study", str(folder), "--findings", *findings, "--out", str(out)]) == 0
    assert "intracranial haemorrhage" in capsys.readouterr().out
    rows = json.loads((out / "findings.json").read_text())["findings"]
    predictor = StudyPredictor.load(released)
    assert predictor.settings.preset == "released"
    prepared = predictor.prepare(folder, volume_modality="auto")
    with torch.no_grad():
        z = writer.encode_study(prepared.tensor())  # token 0 of the writer's model: the findings embedding
    expected = predictor.score(z, findings)["probability"][0]
    np.testing.assert_allclose([r["probability"] for r in rows], expected, atol=1e-5)
    assert not (released / TRAP_MARKER).exists()
