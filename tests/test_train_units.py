"""The training pieces one by one: data sampling, optimiser groups, schedule, freezing, exact
gradient accumulation, checkpoints without pickle, NaN handling, broken studies, the CLI's help."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
import re

import numpy as np
import pytest
import torch

import hlip_core
from hlip_core.loss import ClipLoss, SigLipLoss
from hlip_core.training import (Collate, CosineSchedule, MicroBatch, StepSampler, StudyDataset, TrainConfig, TrainingDiverged,
                                accumulate_gradients, build_optimizer, load_records, lock_text_tower, param_groups, train)
from hlip_core.training import checkpoint as ckpt
from hlip_core.training.optim import decays

from test_train_support import PRETRAIN, pretrain, write_manifest, write_prompts

WORDS = ["there is a bright lesion", "no lesion", "the ventricles are normal", "no midline shift", "this mri study shows:"]


def tiny_model(seed: int = 0, **overrides) -> hlip_core.HLIPModel:
    torch.manual_seed(seed)
    tok = hlip_core.train_wordpiece(WORDS * 3, vocab_size=120, min_frequency=1)
    return hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, **overrides)


def micro_batches(model, sizes, seed=0, scans=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x = torch.rand(b, scans, 1, 32, 64, 64, generator=g)
        mask = torch.ones(b, scans, dtype=torch.bool)
        mask[0, -1] = False  # one padded scan slot per micro-batch
        texts = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (b,), generator=g)]
        out.append(MicroBatch(x, mask, model.tokenize(texts)))
    return out


def concatenated(mbs):
    ids = [m.tokens[0] for m in mbs]
    longest = max(i.shape[1] for i in ids)
    ids = torch.cat([torch.nn.functional.pad(i, (0, longest - i.shape[1])) for i in ids])
    att = torch.cat([torch.nn.functional.pad(m.tokens[1], (0, longest - m.tokens[1].shape[1])) for m in mbs])
    return MicroBatch(torch.cat([m.studies for m in mbs]), torch.cat([m.scan_mask for m in mbs]), (ids, att))


def grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


# -- data -------------------------------------------------------------------------------------

def test_step_sampler_shards_each_step_disjointly_and_walks_through_epoch_permutations():
    world, accum, batch, n = 2, 2, 3, 29
    samplers = [StepSampler(n, batch, accum, rank, world, seed=5, total_steps=6) for rank in range(world)]
    per_epoch = samplers[0].steps_per_epoch
    assert per_epoch == n // (world * accum * batch) == 2
    seen_in_epoch = {}
    for step in range(6):
        shares = [s.step_indices(step) for s in samplers]
        flat = [pair for share in shares for mb in share for pair in mb]
        assert all(len(mb) == batch for share in shares for mb in share) and all(len(share) == accum for share in shares)
        assert len({i for _, i in flat}) == world * accum * batch  # no study twice in a step
        epoch = flat[0][0]
        assert {e for e, _ in flat} == {step // per_epoch}
        seen_in_epoch.setdefault(epoch, []).extend(i for _, i in flat)
    for epoch, indices in seen_in_epoch.items():
        assert len(indices) == len(set(indices))  # nothing repeats within an epoch
    assert seen_in_epoch[0] != seen_in_epoch[1]  # each epoch has its own order


def test_step_sampler_resumed_at_a_step_continues_exactly():
    full = list(StepSampler(20, 2, 2, 1, 2, seed=1, total_steps=9))
    resumed = list(StepSampler(20, 2, 2, 1, 2, seed=1, total_steps=9, start_step=4))
    assert resumed == full[4 * 2 :]


def test_step_sampler_refuses_a_batch_larger_than_the_manifest():
    with pytest.raises(ValueError, match="needs 16 studies"):
        StepSampler(10, 4, 2, 0, 2, seed=0, total_steps=1)


def test_dataset_samples_distinct_scans_shuffles_sentences_and_is_deterministic(tmp_path):
    folder = write_manifest(tmp_path / "prep", studies=4, scans=(5, 5))
    records, root = load_records(folder)
    ds = StudyDataset(records, root, max_scans=3, prefix="This {modality} study shows: ", seed=7)
    sample = ds[(0, 1)]
    assert sample.scans.shape == (3, 1, 32, 64, 64)
    assert sample.scans.dtype == torch.uint8  # uint8 storage stays uint8 until the model (which reads x / 255)
    stored16 = write_manifest(tmp_path / "prep16", studies=4, scans=(5, 5), dtype="float16")
    records16, root16 = load_records(stored16)
    as_float = StudyDataset(records16, root16, max_scans=3, prefix="This {modality} study shows: ", seed=7)[(0, 1)]
    assert as_float.scans.dtype == torch.float32  # other storage comes as float32 in [0, 1]
    torch.testing.assert_close(as_float.scans, sample.scans.float() / 255.0, atol=2e-3, rtol=0)
    flat = sample.scans.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(3) for j in range(i))  # three different scans
    assert sample.text.startswith("This MRI study shows: ")
    body = sample.text[len("This MRI study shows: "):]
    assert sorted(records[1]["sentences"]) == sorted(s for s in records[1]["sentences"] if s in body)
    again = StudyDataset(records, root, max_scans=3, prefix="This {modality} study shows: ", seed=7)[(0, 1)]
    assert torch.equal(again.scans, sample.scans) and again.text == sample.text
    orders = {ds[(epoch, 1)].text for epoch in range(12)}
    assert len(orders) == 2  # two sentences: both orders occur over epochs
    subsets = {tuple(ds[(epoch, 1)].scans[:, 0, 0, 0, :8].flatten().tolist()) for epoch in range(6)}
    assert len(subsets) > 1  # another scan subset in another epoch


def test_collate_pads_studies_and_marks_padding_in_the_scan_mask(tmp_path):
    folder = write_manifest(tmp_path / "prep", studies=6, scans=(1, 3), seed=2)
    records, root = load_records(folder)
    ds = StudyDataset(records, root, max_scans=3)
    counts = [len(r["scans"]) for r in records]
    model = tiny_model()
    batch = Collate(model.tokenizer)([ds[(0, i)] for i in range(6)])
    assert batch["studies"].shape == (6, max(counts), 1, 32, 64, 64)
    assert batch["scan_mask"].sum(dim=1).tolist() == counts
    for i, n in enumerate(counts):
        assert float(batch["studies"][i, n:].abs().sum()) == 0.0
    assert batch["tokens"][0].shape[0] == 6
    assert batch["studies"].dtype == torch.uint8
    # a float sample among uint8 ones: the batch is float32 in [0, 1], the uint8 studies divided by 255
    samples = [ds[(0, i)] for i in range(2)]
    samples[1].scans = samples[1].scans.float() / 255.0
    mixed = Collate(model.tokenizer)(samples)
    assert mixed["studies"].dtype == torch.float32
    torch.testing.assert_close(mixed["studies"][0, : counts[0]], samples[0].scans.float() / 255.0)


def test_a_broken_study_is_logged_and_replaced_by_the_next(tmp_path, caplog):
    folder = write_manifest(tmp_path / "prep", studies=4, scans=(1, 1))
    records, root = load_records(folder)
    (root / records[2]["scans"][0]["path"]).write_bytes(b"not a numpy file")
    ds = StudyDataset(records, root, max_scans=2)
    with caplog.at_level(logging.WARNING, logger="hlip_core.training.data"):
        sample = ds[(0, 2)]
    assert sample.study_id == "s003"
    assert "study s002 skipped" in caplog.text


# -- optimiser, schedule, freezing -------------------------------------------------------------

def test_weight_decay_spares_norms_biases_embeddings_cls_token_and_logit_scale():
    model = tiny_model()
    groups = param_groups(model, 0.1)
    decayed, spared = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for name in ["visual.trunk.cls_token", "logit_scale", "visual.trunk.norm.weight", "visual.trunk.blocks.0.attn.qkv.bias",
                 "text.transformer.embeddings.word_embeddings.weight", "text.transformer.embeddings.position_embeddings.weight",
                 "text.transformer.encoder.layer.0.attention.output.LayerNorm.weight"]:
        assert name in spared, name
    for name in ["visual.trunk.blocks.0.attn.qkv.weight", "visual.trunk.patch_embed.proj.weight", "visual.head.proj.weight",
                 "text.proj.weight", "text.transformer.encoder.layer.1.intermediate.dense.weight"]:
        assert name in decayed, name
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | spared == trainable and not decayed & spared
    assert "visual.trunk.spatial_posemb" not in trainable  # the fixed sin-cos tables are not learned


def test_cosine_schedule_warms_up_linearly_then_decays_to_the_minimum():
    s = CosineSchedule(1e-3, total=110, warmup=10, min_lr=1e-5)
    assert [round(s.lr(i), 8) for i in range(3)] == [1e-4, 2e-4, 3e-4]
    assert s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr(110) == pytest.approx(1e-5)
    assert all(s.lr(i) >= s.lr(i + 1) for i in range(10, 110))


def test_locking_the_text_tower_leaves_only_the_last_layers_and_the_projection_trainable():
    model = tiny_model()
    lock_text_tower(model, unlocked_layers=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")}
    assert "text.proj.weight" in trainable
    assert any(n.startswith("text.transformer.encoder.layer.1.") for n in trainable)
    assert not any(n.startswith("text.transformer.encoder.layer.0.") or ".embeddings." in n for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("visual.") and "posemb" not in n)
    names = {n for g in param_groups(model, 0.1) for n in g["names"]}
    assert "text.transformer.encoder.layer.0.attention.self.query.weight" not in names
    with pytest.raises(ValueError, match="has 2"):
        lock_text_tower(tiny_model(), unlocked_layers=3)


# -- exact gradient accumulation ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_accumulated_gradient_equals_the_large_batch_gradient(kind):
    # float64, so that the comparison tests the algebra and not the summation order of float32 kernels
    # (which differs with the thread count and made a 1e-4 tolerance fail on another machine)
    model = tiny_model(loss=kind).eval().double()  # eval: no random choices, both ways see the same function
    loss_fn = ClipLoss() if kind == "clip" else SigLipLoss()
    mbs = [MicroBatch(m.studies.double(), m.scan_mask, m.tokens) for m in micro_batches(model, [3, 3, 2])]
    big = accumulate_gradients(model, loss_fn, [concatenated(mbs)])
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    losses = accumulate_gradients(model, loss_fn, mbs)
    got = grads(model)
    assert len(losses) == 3
    for loss in losses:
        assert float(loss) == pytest.approx(float(big[0]), rel=1e-10)
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-11, msg=f"gradient of {name}")


def test_naive_accumulation_would_differ_from_the_large_batch():
    """The check above can fail: summing micro-batch losses (each against its own negatives) is not it."""
    model = tiny_model().eval()
    mbs = micro_batches(model, [3, 3])
    accumulate_gradients(model, ClipLoss(), [concatenated(mbs)])
    exact = grads(model)
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        accumulate_gradients(model, ClipLoss(), [mb])
    naive = grads(model)
    assert not torch.allclose(naive["visual.head.proj.weight"], exact["visual.head.proj.weight"], rtol=1e-3, atol=1e-6)


def test_recomputed_micro_batches_replay_the_random_choices_of_the_cached_pass():
    model = tiny_model(vision={"patch_dropout": 0.5, "drop_path": 0.2}, text={"dropout": 0.1}).train()
    mbs = micro_batches(model, [2, 2, 2])
    losses = accumulate_gradients(model, ClipLoss(), mbs, reseed=lambda k: torch.manual_seed(1000 + k))
    assert max(float(l) for l in losses) - min(float(l) for l in losses) < 1e-5
    # without replaying, the recomputed features differ from the cached ones and so do the losses
    losses = accumulate_gradients(model, ClipLoss(), mbs)
    assert max(float(l) for l in losses) - min(float(l) for l in losses) > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().eval()
    mb = micro_batches(model, [3])
    accumulate_gradients(model, ClipLoss(), mb)
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    model.train()  # checkpointing acts in training mode; the encoder's random scan-index rows are fixed by the seed
    model.set_grad_checkpointing(True)
    torch.manual_seed(3)
    accumulate_gradients(model, ClipLoss(), mb)
    checkpointed = grads(model)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(False)
    torch.manual_seed(3)
    accumulate_gradients(model, ClipLoss(), mb)
    reference = grads(model)
    for name, g in reference.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert plain.keys() == reference.keys()


# -- checkpoints -------------------------------------------------------------------------------

def test_optimizer_state_round_trips_by_parameter_name():
    model = tiny_model()
    opt = build_optimizer(model, 1e-3, 0.1)
    accumulate_gradients(model, ClipLoss(), micro_batches(model, [3]))
    opt.step()
    meta, tensors = ckpt.optimizer_state(opt)
    fresh = build_optimizer(model, 5.0, 0.0)
    ckpt.load_optimizer_state(fresh, meta, tensors)
    a, b = opt.state_dict(), fresh.state_dict()
    assert [g["lr"] for g in b["param_groups"]] == [1e-3, 1e-3]
    assert [g["weight_decay"] for g in b["param_groups"]] == [0.1, 0.0]
    for index, state in a["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(b["state"][index][key], value, rtol=0, atol=0)


def test_random_states_round_trip():
    meta, tensors = ckpt.capture_rng()
    first = (torch.rand(3), np.random.rand(3), __import__("random").random())
    ckpt.restore_rng(meta, tensors)
    second = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def _config(tmp_path, **overrides) -> TrainConfig:
    data = write_manifest(tmp_path / "prep", studies=10, scans=(1, 2))
    base = dict(data=str(data), out=str(tmp_path / "run"), steps=4, batch_size=4, max_scans=2, vocab_size=200, lr=1e-3,
                warmup_steps=1, workers=0, checkpoint_every=2, progress=False, tensorboard=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def test_a_run_writes_whole_checkpoints_and_a_final_model_that_loads_without_pickle(tmp_path, monkeypatch):
    result = train(_config(tmp_path))
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step_00000002", "step_00000004"]
    assert result.checkpoint == found[-1]
    assert sorted(p.name for p in found[-1].iterdir()) == ["model", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary leftovers

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    model, doc, opt_tensors, rng_tensors = ckpt.load_checkpoint(found[-1])
    assert doc["step"] == 4 and doc["sampler"]["global_batch"] == 4 and "rank0.torch" in rng_tensors
    final = hlip_core.load(result.model_path)
    assert final.config["preprocess"] == {"target_shape": [32, 64, 64]}
    for (name, a), b in zip(final.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = ClipLoss.forward

    def turns_nan_at_the_third_step(self, *args):
        calls["n"] += 1
        loss = original(self, *args)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setattr(ClipLoss, "forward", turns_nan_at_the_third_step)
    with pytest.raises(TrainingDiverged) as err:
        train(_config(tmp_path, steps=6))
    message = str(err.value)
    assert "the loss became nan at step 3" in message
    assert "step_00000002" in message and "--resume auto" in message
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step_00000002"]
    assert not (tmp_path / "run" / "final").exists()
    ckpt.load_checkpoint(found[-1])  # still whole and loadable


def test_a_run_with_a_broken_study_skips_it_logs_it_and_finishes(tmp_path, caplog):
    config = _config(tmp_path, steps=3, checkpoint_every=10)
    records, root = load_records(config.data)
    (root / records[4]["scans"][0]["path"]).unlink()
    with caplog.at_level(logging.WARNING):
        result = train(config)
    assert "study s004 skipped: FileNotFoundError" in caplog.text
    assert math.isfinite(result.loss) and result.model_path.is_dir()


def test_bf16_autocast_on_the_cpu_trains(tmp_path):
    result = train(_config(tmp_path, steps=2, precision="bf16"))
    assert math.isfinite(result.loss)


def test_eval_during_training_reports_auc_per_finding_and_macro(tmp_path):
    held = write_manifest(tmp_path / "held", studies=8, scans=(1, 2), seed=9)
    prompts = write_prompts(tmp_path / "prompts.json")
    result = train(_config(tmp_path, steps=2, eval_data=str(held), eval_prompts=str(prompts), eval_every=1))
    assert [h["step"] for h in result.history] == [1, 2]
    assert set(result.evaluation["auc"]) == {"lesion"} and result.evaluation["studies"] == 8
    assert 0.0 <= result.evaluation["macro_auc"] <= 1.0


def test_a_new_run_pretrains_its_text_tower_once_and_a_resumed_run_does_not_again(tmp_path):
    held = write_manifest(tmp_path / "held", studies=8, scans=(1, 2), seed=9)
    prompts = write_prompts(tmp_path / "prompts.json")
    options = dict(text_pretrain_steps=30, text_pretrain_batch=8, text_pooling="sentence", lock_text=True, text_feature_norm="whiten",
                   eval_data=str(held), eval_prompts=str(prompts), eval_every=4)
    first = train(_config(tmp_path, **options))
    stats = first.text_pretraining
    assert stats["steps"] == 30 and stats["last_loss"] < stats["first_loss"]
    assert stats["held_out_after"] < stats["held_out_before"]  # measured on the held-out studies' reports
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["text_pretraining"]["steps"] == 30
    text = hlip_core.load(first.model_path).text
    assert text.pooling == "sentence"
    # the standardisation was measured on the pre-trained, locked tower's training reports
    assert text.feature_norm == "whiten" and float(text.feature_mean.norm()) > 0 and not torch.allclose(text.feature_transform, torch.eye(96))
    resumed = train(_config(tmp_path, **options, steps=6, resume="auto"))
    assert resumed.text_pretraining is None  # the checkpoint already holds the pre-trained tower
    again = hlip_core.load(resumed.model_path).text  # and its standardisation, kept as it was
    assert torch.equal(again.feature_mean, text.feature_mean) and torch.equal(again.feature_transform, text.feature_transform)


# -- options and command line ------------------------------------------------------------------

def test_impossible_options_are_refused_with_the_option_named(tmp_path):
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        TrainConfig(data="x", batch_size=0).check()
    with pytest.raises(ValueError, match="--eval-data and --eval-prompts go together"):
        TrainConfig(data="x", eval_data="y").check()
    with pytest.raises(ValueError, match="no training data"):
        TrainConfig().check()
    with pytest.raises(ValueError, match="--text-feature-norm needs --lock-text"):
        TrainConfig(data="x", text_feature_norm="standardise").check()
    with pytest.raises(ValueError, match="--text-feature-norm must be standardise or whiten"):
        TrainConfig(data="x", lock_text=True, text_feature_norm="zca").check()


def test_help_documents_every_option_with_its_default():
    out = pretrain(["--help"], timeout=120)
    assert out.returncode == 0, out.stderr
    options = out.stdout.split("options:", 1)[1]
    # each option's entry runs from its line "  --flag ..." to the next such line
    entries = {m.group(1): m.group(0) for m in re.finditer(r"^  (--[a-z0-9-]+).*?(?=^  -|\Z)", options, re.M | re.S)}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, f"{flag} is not in --help"
        assert "(default:" in entries[flag], f"{flag} has no default in --help"
    assert "torchrun" in out.stdout and "--resume auto" in out.stdout


def test_none_on_the_command_line_unsets_an_option_the_demo_sets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_cli", PRETRAIN)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.parse(["--demo"]).text_feature_norm == "standardise"
    args = cli.parse(["--demo", "--text-feature-norm", "none", "--text-pooling", "none"])
    assert args.text_feature_norm is None and args.text_pooling is None
    assert cli.config_from(args).text_feature_norm is None
    assert cli.parse(["--data", "x", "--loss", "siglip"]).loss == "siglip"


def test_the_command_line_reports_bad_data_without_a_traceback(tmp_path):
    out = pretrain(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")], timeout=120)
    assert out.returncode == 2
    assert "no manifest at" in out.stderr and "Traceback" not in out.stderr


def test_the_encoder_standardises_its_inputs_as_hlip_was_trained():
    """Scans arrive in [0, 1]; the public HLIP training fed (x - 0.449) / 0.226 to the patch embedding,
    so released weights expect it, and uncentred inputs train far worse from scratch."""
    model = tiny_model().eval()
    trunk = model.visual.trunk
    x = torch.rand(2, 2, 1, 32, 64, 64)
    with torch.no_grad():
        got = trunk(x)
        trunk.input_mean, trunk.input_std = 0.0, 1.0
        expected = trunk((x - 0.449) / 0.226)
        unstandardised = trunk(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, unstandardised, atol=1e-3)
    other = hlip_core.create_model("tiny_multiscan_h2", vision={"input_mean": 0.5, "input_std": 0.25}).visual.trunk
    assert (other.input_mean, other.input_std) == (0.5, 0.25)
