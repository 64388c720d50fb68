"""Dual training (sentence and report terms) and the second-stage options: the data's two texts,
exact gradient accumulation through DualObjective, the report temperature's clamp, --patch-dropout
and --init-from reaching the model configuration."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import hlip_core
from hlip_core.loss import DualClipLoss
from hlip_core.model.clip import create_model
from hlip_core.training import Collate, DualObjective, MicroBatch, StudyDataset, TrainConfig, accumulate_gradients, load_records
from hlip_core.training.distributed import DistEnv
from hlip_core.training.optim import clamp_logit_scale, decays
from hlip_core.training.trainer import Trainer

from test_train_support import PRETRAIN, write_manifest
from test_train_units import WORDS, grads, tiny_model

PREFIX = "This study shows: "


class TwoTokenStandIn(torch.nn.Module):
    """The dual model interface (encode_study_tokens -> [B, 2, E], encode_text, logit_scale,
    report_logit_scale) on a few linear layers; the real dual encoder is the model side's."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.img = torch.nn.Linear(16, 2 * 8)
        self.emb = torch.nn.Embedding(50, 8)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
        self.report_logit_scale = torch.nn.Parameter(torch.tensor(1.0))

    def encode_study_tokens(self, x, scan_mask=None, normalize=True):
        pooled = (x.mean(-1) * scan_mask[..., None]).sum(1) / scan_mask.sum(1, keepdim=True)
        return F.normalize(self.img(pooled).view(x.shape[0], 2, 8), dim=-1)

    def encode_text(self, tokens):
        ids, mask = tokens
        z = (self.emb(ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(z, dim=-1)


def dual_batches(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x = torch.rand(b, 2, 16, 4, dtype=torch.float64, generator=g)
        mask = torch.ones(b, 2, dtype=torch.bool)
        mask[0, 1] = False
        sent = (torch.randint(1, 50, (b, 5), generator=g), torch.ones(b, 5))
        report = (torch.randint(1, 50, (b, 9), generator=g), (torch.rand(b, 9, generator=g) > 0.3).double())
        report[1][:, 0] = 1
        out.append(MicroBatch(x, mask, sent, report))
    return out


def test_dual_accumulated_gradient_equals_the_large_batch_gradient():
    model = TwoTokenStandIn().double()
    objective, loss_fn = DualObjective(model), DualClipLoss()
    mbs = dual_batches([3, 3, 2])
    whole = MicroBatch(torch.cat([m.studies for m in mbs]), torch.cat([m.scan_mask for m in mbs]),
                       tuple(torch.cat([m.tokens[i] for m in mbs]) for i in range(2)),
                       tuple(torch.cat([m.report_tokens[i] for m in mbs]) for i in range(2)))
    big = accumulate_gradients(objective, loss_fn, [whole])
    expected = grads(model)
    assert {"logit_scale", "report_logit_scale", "img.weight", "emb.weight"} <= expected.keys()
    model.zero_grad(set_to_none=True)
    losses = accumulate_gradients(objective, loss_fn, mbs)
    got = grads(model)
    for loss in losses:
        assert float(loss) == pytest.approx(float(big[0]), rel=1e-10)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-11, msg=f"gradient of {name}")
    # the report term is really there: without it the report temperature would get no gradient
    assert float(expected["report_logit_scale"].abs()) > 1e-6


def test_dual_objective_on_a_single_token_model_refuses_without_a_report_temperature():
    model = tiny_model().eval()  # a cls-head model: one token, no report temperature
    x = torch.rand(2, 1, 1, 32, 64, 64)
    tokens = model.tokenize(WORDS[:2])
    out = DualObjective(model)(x, tokens, torch.ones(2, 1, dtype=torch.bool), tokens)
    assert out[0].shape == (2, 1, model.config["embed_dim"]) and out[4] is None
    with pytest.raises(ValueError, match="report temperature"):
        DualClipLoss()(*out)
    with pytest.raises(ValueError, match="whole report"):
        DualObjective(model)(x, tokens, torch.ones(2, 1, dtype=torch.bool))


def test_dual_samples_carry_one_random_sentence_and_the_whole_shuffled_report(tmp_path):
    folder = write_manifest(tmp_path / "prep", studies=4, scans=(2, 2))
    records, root = load_records(folder)
    ds = StudyDataset(records, root, max_scans=2, prefix=PREFIX, seed=3, dual=True)
    sentences = records[1]["sentences"]
    seen_sentences, seen_orders = set(), set()
    for epoch in range(16):
        s = ds[(epoch, 1)]
        assert s.text.startswith(PREFIX) and s.text[len(PREFIX):] in sentences
        assert s.report.startswith(PREFIX) and sorted(s.report[len(PREFIX):].split(". ")) != []
        assert all(x in s.report for x in sentences) and len(s.report) == len(PREFIX) + len(" ".join(sentences))
        seen_sentences.add(s.text)
        seen_orders.add(s.report)
    assert len(seen_sentences) == 2 and len(seen_orders) == 2  # both sentences drawn, both orders, over epochs
    again = StudyDataset(records, root, max_scans=2, prefix=PREFIX, seed=3, dual=True)
    assert [(again[(e, 1)].text, again[(e, 1)].report) for e in range(4)] == [(ds[(e, 1)].text, ds[(e, 1)].report) for e in range(4)]
    # the plain dataset of the same seed keeps its texts (the report) unchanged: resumed runs see the same data
    plain = StudyDataset(records, root, max_scans=2, prefix=PREFIX, seed=3)
    assert plain[(0, 1)].text == ds[(0, 1)].report and plain[(0, 1)].report is None
    tok = tiny_model().tokenizer
    batch = Collate(tok)([ds[(0, 0)], ds[(0, 1)]])
    assert batch["report_tokens"][0].shape[0] == 2 and batch["tokens"][0].shape[0] == 2
    assert "report_tokens" not in Collate(tok)([plain[(0, 0)]])
    with pytest.raises(ValueError, match="mixes"):
        Collate(tok)([ds[(0, 0)], plain[(0, 1)]])


def test_the_report_temperature_is_clamped_and_not_decayed():
    model = TwoTokenStandIn()
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
        model.report_logit_scale.fill_(-1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale.detach()) == pytest.approx(4.6052, abs=1e-4) and float(model.report_logit_scale.detach()) == 0.0
    assert not decays("report_logit_scale", model.report_logit_scale)


def _cli_config(argv):
    spec = importlib.util.spec_from_file_location("pretrain_cli", PRETRAIN)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.config_from(cli.parse(argv)), cli.build_parser().format_help()


def test_second_stage_options_reach_the_model_configuration(tmp_path):
    folder = write_manifest(tmp_path / "prep", studies=6, scans=(1, 2))
    first = tiny_model(vision={"patch_dropout": 0.5})
    first_dir = hlip_core.save(first, tmp_path / "first")
    cfg, help_text = _cli_config(["--data", str(folder), "--out", str(tmp_path / "run"), "--init-from", str(first_dir),
                                  "--patch-dropout", "0", "--loss", "dual", "--device", "cpu"])
    assert cfg.init_from == str(first_dir) and cfg.patch_dropout == 0.0 and cfg.loss == "dual"
    for flag in ("--init-from", "--patch-dropout", "dual"):
        assert flag in help_text
    trainer = Trainer(cfg, DistEnv(), torch.device("cpu"))
    assert trainer.model_overrides()["vision"]["patch_dropout"] == 0.0 and trainer.model_overrides()["loss"] == "dual"
    cfg.loss = None
    model = Trainer(cfg, DistEnv(), torch.device("cpu"))._new_model()
    assert model.config["vision"]["patch_dropout"] == 0.0  # the first stage's 0.5 is overridden
    assert first.config["vision"]["patch_dropout"] == 0.5
    source = first.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, source[name]), name
    assert model.tokenizer is not None
    # an override that changes a weight's shape is a clear error naming it, never a partial load
    cfg.model_overrides = {"embed_dim": 32}
    with pytest.raises(hlip_core.CheckpointMismatchError, match="init-from"):
        Trainer(cfg, DistEnv(), torch.device("cpu"))._new_model()


def test_model_api_names_the_embedding_and_temperature_of_each_use():
    plain = tiny_model().eval()
    x = torch.rand(2, 2, 1, 32, 64, 64)
    with torch.no_grad():
        tokens = plain.encode_study_tokens(x)
        assert tokens.shape == (2, 1, plain.config["embed_dim"])
        assert torch.equal(plain.encode_study(x), tokens[:, 0]) and torch.equal(plain.encode_study_for_reports(x), tokens[:, 0])
    assert plain.report_logit_scale is None and float(plain.report_scale()) == pytest.approx(float(plain.logit_scale.exp()))
    dual = create_model("tiny_multiscan_h2", tokenizer=plain.tokenizer, loss="dual")
    with torch.no_grad():
        dual.report_logit_scale.fill_(math.log(42.0))
    assert float(dual.report_scale()) == pytest.approx(42.0) and float(dual.logit_scale.exp()) != pytest.approx(42.0)
    assert "report_logit_scale" in dual.state_dict() and "report_logit_scale" not in plain.state_dict()
