"""Checkpoint round trips, mismatch errors, and import of released (open_clip format) HLIP weights."""
import json

import pytest
import torch

import hlip_core
from hlip_core.model.registry import get_config
from hlip_core.model.text import ReportTokenizer

from naive_reference import study_feature

REPORTS = [
    "There is a large enhancing mass in the left frontal lobe with surrounding oedema.",
    "No intracranial haemorrhage. No midline shift.",
    "Acute infarct in the right middle cerebral artery territory.",
    "Ventricles and sulci are normal in size for age.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return hlip_core.train_wordpiece(REPORTS, vocab_size=300, min_frequency=1, context_length=32)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return hlip_core.create_model("tiny_multiscan_h3", tokenizer=tokenizer).eval()


def test_round_trip_gives_the_same_embeddings(tmp_path, tiny_model):
    folder = hlip_core.save(tiny_model, tmp_path / "ckpt", extra={"step": 7})
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    loaded = hlip_core.load(folder)
    assert loaded.extra == {"step": 7}
    x = torch.randn(2, 3, 1, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_study(x), tiny_model.encode_study(x), atol=0, rtol=0)
        texts = ["no haemorrhage", "a frontal mass with oedema"]
        torch.testing.assert_close(loaded.encode_text(texts), tiny_model.encode_text(texts), atol=0, rtol=0)
    assert loaded.config == tiny_model.config


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, tiny_model, tokenizer):
    hlip_core.save(tiny_model, tmp_path / "ckpt")
    other = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tokenizer)
    hlip_core.save(other, tmp_path / "ckpt")
    assert hlip_core.load(tmp_path / "ckpt").config["name"] == "tiny_multiscan_h2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    hlip_core.save(tiny_model, tmp_path / "ckpt", extra={"v": 1})

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        hlip_core.save(tiny_model, tmp_path / "ckpt", extra={"v": 2})
    assert hlip_core.load(tmp_path / "ckpt").extra == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_checkpoint_of_another_configuration_lists_the_keys(tmp_path, tiny_model):
    hlip_core.save(tiny_model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    meta["config"]["vision"]["depth"] = 4
    meta["config"]["vision"]["levels"] = ["slice", "scan", "study", "study"]
    meta["config"]["vision"]["width"] = 48
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(hlip_core.CheckpointMismatchError) as err:
        hlip_core.load(tmp_path / "ckpt")
    text = str(err.value)
    assert "Unexpected keys (24)" in text and "visual.trunk.blocks.4.norm1.weight" in text
    assert "visual.trunk.blocks.5.attn.qkv.weight" in err.value.unexpected
    assert "Shape mismatches" in text and "visual.trunk.cls_token" in text
    with pytest.raises(ValueError, match="is of configuration 'tiny_multiscan_h3', not 'tiny_multiscan_h2'"):
        hlip_core.save(tiny_model, tmp_path / "c2")
        hlip_core.load(tmp_path / "c2", config_name="tiny_multiscan_h2")


def test_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HLIP checkpoint folder"):
        hlip_core.load(tmp_path)


# -- released checkpoints --------------------------------------------------------------------


def official_state(config_name, text_hidden=64, seed=0):
    """A state dict laid out as the released files are: open_clip names under 'module.'."""
    torch.manual_seed(seed)
    cfg = get_config(config_name)
    cfg["text"].update(hidden=text_hidden, layers=2, heads=1, intermediate=128, vocab_size=120, max_positions=64)
    model = hlip_core.HLIPModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)  # no zero biases: wrong mapping must show
    state = {"module." + k: v for k, v in model.state_dict().items()}
    state["module.text.transformer.pooler.dense.weight"] = torch.randn(text_hidden, text_hidden)  # older open_clip
    return state


def test_released_checkpoint_embeds_studies_like_the_reference_formula(tmp_path):
    name = "vit_base_multiscan_h2_token588"
    state = official_state(name)
    path = tmp_path / "hlip_brainmri.pt"
    torch.save({"epoch": 20, "name": "hlip", "state_dict": state}, path)
    model = hlip_core.load_official_checkpoint(path, name)
    study = torch.randn(2, 1, 32, 32, 32)  # two scans, 2x2x2 patches each
    with torch.no_grad():
        ours = model.encode_study(study[None], normalize=False)[0]
    sd = {k[len("module.visual.trunk."):]: v for k, v in state.items() if k.startswith("module.visual.trunk.")}
    trunk_feature = study_feature(sd, get_config(name)["vision"]["levels"], (16, 16, 16), 12, study)
    expected = trunk_feature @ state["module.visual.head.proj.weight"].T
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert float(model.logit_scale.detach()) == float(state["module.logit_scale"])


def test_released_checkpoint_with_its_text_folder(tmp_path):
    from transformers import BertConfig, BertModel

    name = "vit_base_singlescan_h2_token2744"
    state = official_state(name, seed=1)
    path = tmp_path / "hlip_chestct.pt"
    torch.save({"state_dict": state}, path)
    # a local Hugging Face folder standing in for BiomedBERT: config + tokenizer (weights come from the checkpoint)
    folder = tmp_path / "biomedbert"
    BertModel(BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                         intermediate_size=128, max_position_embeddings=64), add_pooling_layer=False).save_pretrained(folder)
    tok = hlip_core.train_wordpiece(REPORTS, vocab_size=120, min_frequency=1)
    tok.save(folder)
    model = hlip_core.load_official_checkpoint(path, name, text_folder=str(folder))
    ids, mask = model.tokenize(["no pleural effusion"])
    with torch.no_grad():
        got = model.encode_text((ids, mask), normalize=False)
    ref = BertModel(BertConfig.from_pretrained(folder), add_pooling_layer=False).eval()
    ref.load_state_dict({k[len("module.text.transformer."):]: v for k, v in state.items()
                         if k.startswith("module.text.transformer.") and "pooler" not in k})
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0] @ state["module.text.proj.weight"].T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_released_checkpoint_of_another_configuration_is_refused(tmp_path):
    state = official_state("vit_base_multiscan_h2_token588")
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(hlip_core.CheckpointMismatchError, match="patch_embed.proj.weight checkpoint \\(768, 1, 16, 16, 16\\) vs model \\(768, 1, 8, 16, 16\\)"):
        hlip_core.load_official_checkpoint(path, "vit_base_multiscan_h2_token1176")


def test_pickled_objects_in_a_checkpoint_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "args": Evil()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        hlip_core.load_official_checkpoint(path, "vit_base_multiscan_h2_token588")


def test_tokenizer_folder_round_trip(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tok")
    again = ReportTokenizer.load(tmp_path / "tok", 32)
    assert torch.equal(again(["left frontal mass"])[0], tokenizer(["left frontal mass"])[0])
    with pytest.raises(ValueError, match="empty"):
        tokenizer(["fine", "  "])
