"""Released HLIP models in their Hugging Face folder form: loaded without a name, exactly, never
partially, without importing the folder's vendored code; imported, served and trained from."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import hlip_core
from hlip_core.inference import StudyPredictor
from hlip_core.model import CheckpointMismatchError, get_config, load
from released_factory import TRAP_MARKER, write_released_folder
from test_train_support import pretrain, run_options, write_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import import_checkpoint as import_cli  # noqa: E402

NAME = "tiny_multiscan_h2"
# the tiny forms of each released architecture: dino.txt head; dual (one register token, loss dual);
# dino.txt without the scan-index table (ablate_seqposemb)
RELEASED_TINY = ["tiny_multiscan_h2_dinotxt", "tiny_multiscan_h2_dualdinotxt", "tiny_seqposemb_multiscan_h2_dinotxt"]


def _study(seed=0, scans=2):
    return torch.rand(1, scans, 1, 32, 64, 64, generator=torch.Generator().manual_seed(seed))


def _assert_same_embeddings(loaded, writer):
    x = _study()
    texts = ["no acute intracranial haemorrhage.", "this study shows: mass effect and midline shift."]
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_study_tokens(x), writer.encode_study_tokens(x), rtol=0, atol=1e-6)
        ids, mask = loaded.tokenizer(texts)
        assert ids.shape[1] > 5 and int((ids == 1).sum()) == 0  # every word known: real tokens, not [UNK]
        torch.testing.assert_close(loaded.encode_text((ids, mask)), writer.encode_text(writer.tokenizer(texts)), rtol=0, atol=1e-6)


def _no_vendored_import(folder: Path):
    assert not (folder / TRAP_MARKER).exists()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        assert not path.startswith(str(folder)), f"{module.__name__} was imported from the released folder"


@pytest.mark.parametrize("name", [NAME, *RELEASED_TINY])
def test_a_released_folder_loads_without_a_name_and_embeds_like_its_writer(tmp_path, name):
    folder = tmp_path / "hlip-released"
    writer = write_released_folder(folder, name)
    model = hlip_core.load_official_checkpoint(folder)
    _assert_same_embeddings(model, writer)
    cfg = get_config(name)
    assert model.config["vision"] == cfg["vision"] and model.config["loss"] == cfg["loss"]
    assert float(model.logit_scale.detach()) == float(writer.logit_scale.detach()) and model.logit_bias is None
    assert model.config["text"]["context_length"] == 256 and model.tokenizer.context_length == 256
    released = model.config["released"]
    assert released["timm_model_name"] == name and released["source"] == "released-hf-folder"
    assert released["preprocess_cfg"]["mean"] == [0.449]
    assert model.config["preprocess"] == {"preset": "released", "target_shape": [32, 64, 64]}
    tokens = 1 + int(cfg["vision"].get("num_registers", 0)) if cfg["vision"].get("head") == "dinotxt" else 1
    with torch.no_grad():
        assert model.encode_study_tokens(_study()).shape == (1, tokens, 64)
    # hlip_core.load and StudyPredictor.load (the server's and Slicer's path) open the same folder
    again = load(folder)
    _assert_same_embeddings(again, writer)
    assert StudyPredictor.load(folder).settings.target_shape == (32, 64, 64)
    _no_vendored_import(folder)


def test_a_dual_folder_keeps_its_report_temperature_and_uses_token_1_for_reports(tmp_path):
    folder = tmp_path / "dual"
    writer = write_released_folder(folder, "tiny_multiscan_h2_dualdinotxt", report_temperature=2.5)
    model = hlip_core.load_official_checkpoint(folder)
    # logit_bias is the report temperature: not a SigLIP bias, no SigLIP loss
    assert model.config["loss"] == "dual" and model.logit_bias is None
    assert float(model.report_logit_scale.detach()) == 2.5
    torch.testing.assert_close(model.report_scale(), torch.tensor(2.5).exp())
    assert float(model.logit_scale.detach()) == float(writer.logit_scale.detach()) != 2.5
    x = _study(seed=3, scans=3)
    with torch.no_grad():
        tokens = writer.encode_study_tokens(x)
        study, reports = model.encode_study(x), model.encode_study_for_reports(x)
    assert tokens.shape == (1, 2, 64)
    torch.testing.assert_close(study, tokens[:, 0], rtol=0, atol=1e-6)  # findings / zero-shot: token 0
    torch.testing.assert_close(reports, tokens[:, 1], rtol=0, atol=1e-6)  # report search: token 1
    assert (study - reports).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["ablate_seqposemb_vit_base_multiscan_h2_dualdinotxt1568",
                                  "ablate_seqposemb_vit_large_multiscan_h2_dualdinotxt1568",
                                  "ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568", "vit_base_multiscan_h2_dinotxt1568"])
def test_a_real_released_name_resolves_to_its_configuration_and_small_weights_are_named(tmp_path, name):
    # small weights under a real released name: the folder resolves to that configuration (shapes of
    # the full-size model in the error), and the mismatch is found before a full-size model is built
    folder = tmp_path / "real-name"
    write_released_folder(folder, "tiny_multiscan_h2_dualdinotxt")
    path = folder / "open_clip_config.json"
    meta = json.loads(path.read_text())
    meta["model_cfg"]["vision_cfg"]["timm_model_name"] = name
    meta["model_cfg"]["embed_dim"] = 768
    path.write_text(json.dumps(meta))
    cfg = get_config(name)
    width, patch = cfg["vision"]["width"], tuple(cfg["vision"]["patch_size"])
    assert patch == (6, 16, 16) and cfg["vision"]["img_size"] == [48, 224, 224] and cfg["vision"]["head"] == "dinotxt"
    built = []
    real_init = hlip_core.HLIPModel.__init__

    def spy(self, config, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # the default device the model is built on
        real_init(self, config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hlip_core.HLIPModel, "__init__", spy)
        with pytest.raises(CheckpointMismatchError) as err:
            hlip_core.load_official_checkpoint(folder)
    text = str(err.value)
    assert f"configuration {name}" in text and "model.safetensors" in text
    assert f"visual.trunk.patch_embed.proj.weight checkpoint (96, 1, 8, 16, 16) vs model ({width}, 1, {', '.join(map(str, patch))})" in text
    missing, unexpected = err.value.missing, err.value.unexpected
    assert ("text.proj.weight", (64, 32), (768, 32)) in [(k, tuple(a), tuple(b)) for k, a, b in err.value.misshaped]
    assert f"visual.trunk.blocks.{cfg['vision']['depth'] - 1}.attn.qkv.weight" in missing  # 12 or 24 blocks, not 6
    assert ("visual.trunk.sequential_posemb" in missing) == (cfg["vision"].get("scan_posemb") is not False)
    assert ("visual.trunk.reg_token" in unexpected) == (cfg["vision"]["num_registers"] == 0)
    assert built == ["meta"]  # only the shape skeleton was built


def test_the_vendored_code_is_never_imported_even_with_the_folder_on_sys_path(tmp_path, monkeypatch):
    folder = tmp_path / "hlip-released"
    write_released_folder(folder, NAME)
    monkeypatch.syspath_prepend(str(folder))  # as a user running from inside the folder would have it
    hlip_core.load_official_checkpoint(folder)
    load(folder)
    _no_vendored_import(folder)
    assert "hlip" not in sys.modules


def test_a_bin_only_folder_loads_with_weights_only(tmp_path, monkeypatch):
    folder = tmp_path / "bin-only"
    writer = write_released_folder(folder, NAME, weights=("bin",))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    _assert_same_embeddings(hlip_core.load_official_checkpoint(folder), writer)
    assert calls == [True]


def test_safetensors_is_read_first(tmp_path):
    folder = tmp_path / "both"
    writer = write_released_folder(folder, NAME)
    (folder / "pytorch_model.bin").write_bytes(b"not a torch file")
    _assert_same_embeddings(hlip_core.load_official_checkpoint(folder), writer)


def test_a_logit_bias_of_a_non_dual_model_is_a_siglip_bias(tmp_path):
    folder = tmp_path / "siglip"
    write_released_folder(folder, NAME, weights=("bin",))
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["logit_bias"] = torch.tensor(-10.0)
    torch.save(state, folder / "pytorch_model.bin")
    model = hlip_core.load_official_checkpoint(folder)
    assert model.config["loss"] == "siglip" and float(model.logit_bias.detach()) == -10.0 and model.report_logit_scale is None


@pytest.mark.parametrize("name", ["vit_base_multiscan_h2_dinotxt1568x", "../tiny_multiscan_h2"])
def test_an_unknown_architecture_is_named_with_the_known_ones(tmp_path, name):
    folder = tmp_path / "unknown"
    write_released_folder(folder, NAME)
    meta = json.loads((folder / "open_clip_config.json").read_text())
    meta["model_cfg"]["vision_cfg"]["timm_model_name"] = name
    (folder / "open_clip_config.json").write_text(json.dumps(meta))
    with pytest.raises(KeyError, match=r"unknown timm_model_name .*" + name.replace(".", r"\.") + r".*known: .*tiny_multiscan_h2"):
        hlip_core.load_official_checkpoint(folder)
    with pytest.raises(KeyError, match="unknown timm_model_name"):
        load(folder)


def test_a_name_given_must_match_and_a_pt_file_needs_one(tmp_path):
    folder = tmp_path / "named"
    write_released_folder(folder, NAME, weights=("bin",))
    with pytest.raises(ValueError, match="holds 'tiny_multiscan_h2', not 'tiny_multiscan_h3'"):
        hlip_core.load_official_checkpoint(folder, "tiny_multiscan_h3")
    hlip_core.load_official_checkpoint(folder, NAME)
    with pytest.raises(ValueError, match="single weights file: give the configuration"):
        hlip_core.load_official_checkpoint(folder / "pytorch_model.bin")


def test_a_wrong_embed_dim_or_context_length_is_named(tmp_path):
    folder = tmp_path / "cfg"
    write_released_folder(folder, NAME)
    path = folder / "open_clip_config.json"
    meta = json.loads(path.read_text())
    meta["model_cfg"]["embed_dim"] = 768
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="embed_dim 768 but tiny_multiscan_h2 has 64"):
        hlip_core.load_official_checkpoint(folder)
    meta["model_cfg"]["embed_dim"] = 64
    meta["model_cfg"]["text_cfg"]["context_length"] = 512
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="context_length 512 exceeds the text tower's 256 positions"):
        hlip_core.load_official_checkpoint(folder)


def _rewrite_safetensors(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_a_missing_or_misshaped_tensor_is_named_and_nothing_is_loaded(tmp_path):
    folder = tmp_path / "bad"
    write_released_folder(folder, NAME)
    _rewrite_safetensors(folder, lambda s: s.pop("visual.trunk.blocks.3.attn.qkv.weight"))
    with pytest.raises(CheckpointMismatchError, match=r"model\.safetensors[\s\S]*Missing keys \(1\): visual\.trunk\.blocks\.3\.attn\.qkv\.weight"):
        hlip_core.load_official_checkpoint(folder)
    _rewrite_safetensors(folder, lambda s: s.update({"visual.trunk.blocks.3.attn.qkv.weight": torch.zeros(288, 95),
                                                     "visual.trunk.extra_token": torch.zeros(3)}))
    with pytest.raises(CheckpointMismatchError) as err:
        load(folder)
    text = str(err.value)
    assert "visual.trunk.blocks.3.attn.qkv.weight checkpoint (288, 95) vs model (288, 96)" in text
    assert "Unexpected keys (1): visual.trunk.extra_token" in text


@pytest.mark.parametrize("which", ["safetensors", "bin"])
def test_a_truncated_weight_file_is_a_clear_error_naming_it(tmp_path, which):
    folder = tmp_path / "cut"
    write_released_folder(folder, NAME, weights=(which,))
    path = folder / ("model.safetensors" if which == "safetensors" else "pytorch_model.bin")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{path.name} cannot be read.*truncated or corrupt"):
        hlip_core.load_official_checkpoint(folder)


def test_a_folder_without_weights_or_config_is_named(tmp_path):
    folder = tmp_path / "empty"
    write_released_folder(folder, NAME, weights=())
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        hlip_core.load_official_checkpoint(folder)
    (folder / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="open_clip_config.json is not valid JSON"):
        hlip_core.load_official_checkpoint(folder)
    (folder / "open_clip_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="without open_clip_config.json"):
        hlip_core.load_official_checkpoint(folder)


def test_import_checkpoint_writes_a_project_folder_from_a_released_folder(tmp_path, capsys):
    folder = tmp_path / "hlip-released"
    writer = write_released_folder(folder, NAME)
    out = tmp_path / "imported"
    assert import_cli.main([str(folder), str(out)]) == 0
    assert "with its tokenizer" in capsys.readouterr().out
    assert (out / "config.json").is_file() and not (out / "open_clip_config.json").exists()
    model = load(out)
    _assert_same_embeddings(model, writer)
    assert model.config["released"]["timm_model_name"] == NAME
    assert model.config["preprocess"]["preset"] == "released"
    assert model.extra["imported_from"] == folder.name  # the folder's name only: no local path in the checkpoint
    help_text = import_cli.build_parser().format_help()
    assert "open_clip_config.json" in help_text and "--config" in help_text
    _no_vendored_import(folder)


def test_import_checkpoint_of_a_pt_file_still_needs_its_configuration(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"logit_scale": torch.tensor(1.0)}}, path)
    with pytest.raises(ValueError, match="give the configuration"):
        import_cli.main([str(path), str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_pretrain_init_from_a_released_folder_runs_a_training_step(tmp_path):
    folder = tmp_path / "hlip-released"
    writer = write_released_folder(folder, NAME)
    data = write_manifest(tmp_path / "prep", studies=4, scans=(1, 2))
    run = tmp_path / "run"
    proc = pretrain(run_options(data, run, steps=1, batch_size=2, init_from=str(folder), vocab_size=None))
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load(run / "final")
    assert trained.config["released"]["timm_model_name"] == NAME
    assert trained.config["preprocess"]["target_shape"] == [32, 64, 64] and "preset" not in trained.config["preprocess"]
    before, after = writer.state_dict(), trained.state_dict()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert "visual.trunk.patch_embed.proj.weight" in changed and "text.proj.weight" in changed
    assert torch.allclose(after["visual.trunk.patch_embed.proj.weight"], before["visual.trunk.patch_embed.proj.weight"], atol=0.05)
    _no_vendored_import(folder)


def test_a_rope_folder_loads_by_name_and_stray_rotary_tensors_are_named(tmp_path):
    """The ablate_rope models store no rotary tensor (the angles come from the positions): their
    folders load with the plain key set, and a state dict that does carry one is refused by name."""
    folder = tmp_path / "hlip-rope"
    writer = write_released_folder(folder, "tiny_rope_multiscan_h2_dinotxt")
    model = hlip_core.load_official_checkpoint(folder)
    assert model.config["released"]["timm_model_name"] == "tiny_rope_multiscan_h2_dinotxt"
    assert model.visual.trunk.rope == {"base": 10000.0}
    _assert_same_embeddings(model, writer)
    # the same weights without the rotation embed otherwise: the setting is what makes it this model
    cfg = dict(writer.config, vision=dict(writer.config["vision"], rope=None))
    unturned = hlip_core.HLIPModel(cfg, tokenizer=writer.tokenizer).eval()
    unturned.load_state_dict(writer.state_dict())
    with torch.no_grad():
        assert (unturned.encode_study_tokens(_study()) - model.encode_study_tokens(_study())).abs().max() > 1e-4
    _rewrite_safetensors(folder, lambda s: s.update({"visual.trunk.blocks.0.attn.rope.freqs": torch.zeros(4)}))
    with pytest.raises(CheckpointMismatchError, match=r"Unexpected keys \(1\): visual\.trunk\.blocks\.0\.attn\.rope\.freqs"):
        hlip_core.load_official_checkpoint(folder)
    _no_vendored_import(folder)
