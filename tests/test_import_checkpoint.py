"""train/import_checkpoint.py: a released HLIP .pt file becomes a checkpoint folder the predictor and server load."""
import sys
from pathlib import Path

import pytest
import torch

import hlip_core
from hlip_core.inference import StudyPredictor
from test_checkpoint import official_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import import_checkpoint as import_cli  # noqa: E402


def test_a_released_checkpoint_becomes_a_folder_with_preprocessing(tmp_path, capsys):
    name = "vit_base_multiscan_h2_token588"
    path = tmp_path / "hlip_brainmri.pt"
    torch.save({"state_dict": official_state(name)}, path)
    assert import_cli.main([str(path), "--config", name, "--out", str(tmp_path / "ckpt"), "--percentiles", "1", "99"]) == 0
    assert "without a tokenizer" in capsys.readouterr().out
    predictor = StudyPredictor.load(tmp_path / "ckpt")
    assert predictor.settings.target_shape == (48, 224, 224) and predictor.settings.percentiles == (1.0, 99.0)
    direct = hlip_core.load_official_checkpoint(path, name)
    study = torch.rand(1, 2, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(predictor.model.encode_study(study), direct.encode_study(study))


def test_a_file_of_another_configuration_is_named(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": official_state("vit_base_multiscan_h2_token588")}, path)
    with pytest.raises(ValueError, match="does not match the model configuration"):
        import_cli.main([str(path), "--config", "vit_base_singlescan_h2_token2744", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
