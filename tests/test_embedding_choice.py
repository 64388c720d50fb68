"""Each caller picks the study embedding it should: findings (zero-shot, probes) token 0, report
search the last token. A two-token stand-in visual tower makes the two tokens different, so each
answer shows which one it followed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hlip_core
from hlip_core.eval.embedding import embed_manifest, study_encoder
from hlip_core.inference import PreparedScan, PreparedStudy, StudyPredictor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import embed as embed_cli  # noqa: E402

GRID = (8, 16, 16)


class TwoTokens(nn.Module):
    """Stand-in visual tower: [B, N, 1, D, H, W] -> [B, 2, E], two unrelated linear maps of the
    scans' mean per coarse block (token 0 and token 1)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.maps = nn.Parameter(torch.randn(2, embed_dim, 4 * 4 * 4, generator=g))

    def forward(self, x, scan_mask=None):
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        b, n = x.shape[:2]
        pooled = F.adaptive_avg_pool3d(x.reshape(b * n, 1, *x.shape[-3:]), 4).reshape(b, n, -1)
        w = torch.ones(b, n) if scan_mask is None else scan_mask.float()
        pooled = (pooled * w[..., None]).sum(1) / w.sum(1, keepdim=True)
        return torch.einsum("tef,bf->bte", self.maps, pooled)


def dual_stand_in():
    model = hlip_core.create_model("tiny_multiscan_h2", loss="dual")
    model.visual = TwoTokens(model.config["embed_dim"])
    model.config["vision"]["img_size"] = list(GRID)
    return model.eval()


def tokens(model, x, mask=None):
    with torch.no_grad():
        z = F.normalize(model.visual(x, mask), dim=-1)
    return z[:, 0].numpy(), z[:, 1].numpy()


@pytest.fixture(scope="module")
def studies():
    return torch.from_numpy(np.random.default_rng(0).random((3, 2, 1, *GRID), dtype=np.float32))


def test_the_two_tokens_of_the_stand_in_differ(studies):
    t0, t1 = tokens(dual_stand_in(), studies)
    assert np.abs(t0 - t1).max() > 0.1


def test_predictor_embeds_for_search_with_the_last_token_and_for_findings_with_token_0(studies):
    model = dual_stand_in()
    predictor = StudyPredictor(model)
    prepared = [PreparedStudy(f"s{i}", [PreparedScan(f"c{k}", "MR", "", None, a[0].numpy(), {}) for k, a in enumerate(st)])
                for i, st in enumerate(studies)]
    t0, t1 = tokens(model, studies)
    np.testing.assert_allclose(predictor.embed(prepared), t1, atol=1e-6)  # default: search
    np.testing.assert_allclose(predictor.embed(prepared, embedding="reports"), t1, atol=1e-6)
    np.testing.assert_allclose(predictor.embed(prepared, embedding="findings"), t0, atol=1e-6)
    with pytest.raises(ValueError, match="embedding must be one of"):
        predictor.embed(prepared, embedding="cls")


def test_report_scale_is_the_report_temperature_of_a_dual_model():
    model = dual_stand_in()
    with torch.no_grad():
        model.report_logit_scale.fill_(np.log(3.0))
        model.logit_scale.fill_(np.log(20.0))
    assert float(model.report_scale().detach()) == pytest.approx(3.0)
    assert study_encoder(model, "reports") == model.encode_study_for_reports
    assert study_encoder(model, "findings") == model.encode_study


def write_manifest(folder: Path, x: torch.Tensor) -> None:
    (folder / "arrays").mkdir(parents=True)
    lines = []
    for i, study in enumerate(x.numpy()):
        scans = []
        for k, vol in enumerate(study[:, 0]):
            rel = f"arrays/s{i}_{k}.npy"
            np.save(folder / rel, np.round(vol * 255).astype(np.uint8))
            scans.append({"scan_id": f"s{i}_{k}", "path": rel, "shape": list(vol.shape), "dtype": "uint8", "modality": "MR"})
        lines.append(json.dumps({"study_id": f"s{i}", "scans": scans, "report": None, "sentences": []}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def test_embed_manifest_and_train_embed_record_and_use_the_chosen_token(studies, tmp_path, monkeypatch):
    model = dual_stand_in()
    write_manifest(tmp_path / "data", studies)
    stored = torch.from_numpy(np.stack([np.round(s.numpy() * 255).astype(np.uint8) for s in studies]))
    t0, t1 = tokens(model, stored)
    findings = embed_manifest(model, tmp_path / "data", tmp_path / "f", progress=False, embedding="findings")
    reports = embed_manifest(model, tmp_path / "data", tmp_path / "r", progress=False, embedding="reports")
    np.testing.assert_allclose(np.asarray(findings.embeddings, np.float32), t0, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.asarray(reports.embeddings, np.float32), t1, atol=2e-3)
    assert json.loads((tmp_path / "r" / "export.json").read_text())["embedding"] == "reports"
    with pytest.raises(ValueError, match="embedding"):  # resuming with the other token is refused
        embed_manifest(model, tmp_path / "data", tmp_path / "r", progress=False, embedding="findings")
    # the CLI: reports by default (the stand-in cannot be saved, so the loader hands it over)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(hlip_core.model, "load", lambda *a, **k: model)
    base = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--quiet"]
    assert embed_cli.main(base + ["--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "export.json").read_text())["embedding"] == "reports"
    np.testing.assert_allclose(np.asarray(hlip_core.eval.EmbeddingIndex.load(tmp_path / "cli").embeddings, np.float32), t1, atol=2e-3)
    assert embed_cli.main(base + ["--out", str(tmp_path / "cli0"), "--embedding", "findings", "--approximate", "--lists", "1"]) == 0
    index = hlip_core.eval.EmbeddingIndex.load(tmp_path / "cli0")
    np.testing.assert_allclose(np.asarray(index.embeddings, np.float32), t0, atol=2e-3)
    # --approximate: a FAISS index of every row, recorded with the embedding kind, which search then uses
    assert index.ann.ntotal == len(index) and index.ann_params["embedding"] == "findings" and index.ann_params["nprobe"] == 16
    assert index.search(t0[:1], k=1)[0][0][0] == index.ids[0]


def test_the_servers_search_index_embeds_with_the_report_token(studies):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "monailabel_app"))
    from lib.infers.hlip_findings import HLIPFindings

    model = dual_stand_in()
    prepared = PreparedStudy("s", [PreparedScan(f"c{k}", "MR", "", None, a[0].numpy(), {}) for k, a in enumerate(studies[0])])

    class Task:  # the task's state that embed() reads: its predictor and its study preparation
        predictor = StudyPredictor(model)

        def prepare(self, study, files_of):
            return prepared

    t0, t1 = tokens(model, studies[:1])
    np.testing.assert_allclose(HLIPFindings.embed(Task(), None, None), t1[0], atol=1e-6)
    assert np.abs(t1[0] - t0[0]).max() > 0.1
