"""Metrics, thresholds, retrieval and prompt sets, on known inputs."""
import json
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from hlip_core.eval import EmbeddingIndex, benchmark_names, findings_from_text, load_prompt_set
from hlip_core.eval.metrics import (
    auc_per_finding,
    choose_thresholds,
    classification_table,
    format_table,
    macro,
    recall_at_k,
    roc_png,
)
from realdata import ct_rate_labels_csv


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    s = y * 0.7 + rng.normal(0, 0.5, y.shape)
    names = ["a", "b", "c"]
    aucs = auc_per_finding(y, s, names)
    for j, n in enumerate(names):
        assert aucs[n] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
    assert macro(aucs) == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)]))
    thr = {"a": 0.3, "b": 0.1, "c": 0.5}
    rows = classification_table(y, s, names, thr, n_boot=200)
    for j, r in enumerate(rows):
        pred = s[:, j] >= thr[names[j]]
        assert r.balanced_accuracy == pytest.approx(balanced_accuracy_score(y[:, j], pred))
        assert r.f1 == pytest.approx(f1_score(y[:, j], pred))
        assert r.sensitivity == pytest.approx(pred[y[:, j] == 1].mean())
        assert r.specificity == pytest.approx((~pred[y[:, j] == 0]).mean())
        assert r.auc_low < r.auc < r.auc_high
    assert "macro" in format_table(rows)


def test_unknown_labels_are_left_out_not_counted_negative():
    y = np.array([[1.0], [0.0], [np.nan], [1.0], [0.0]])
    s = np.array([[0.9], [0.1], [0.0], [0.8], [0.2]])
    assert auc_per_finding(y, s, ["x"])["x"] == 1.0


def test_thresholds_come_from_the_validation_split_only():
    rng = np.random.default_rng(1)
    y_val = rng.integers(0, 2, (100, 1)).astype(float)
    s_val = y_val + rng.normal(0, 0.3, y_val.shape)
    thr = choose_thresholds(y_val, s_val, ["x"])
    y_test = rng.integers(0, 2, (100, 1)).astype(float)
    s_test = y_test + rng.normal(0, 0.3, y_test.shape) + 5.0  # shifted test scores
    rows_a = classification_table(y_test, s_test, ["x"], thr, n_boot=0)
    rows_b = classification_table(1 - y_test, s_test, ["x"], thr, n_boot=0)
    assert rows_a[0].threshold == rows_b[0].threshold == thr["x"]  # test labels never move it
    assert rows_a[0].specificity == 0.0  # every shifted test score is above the validation threshold


def test_roc_png_is_written(tmp_path):
    y = np.array([[0, 1], [1, 0], [1, 1], [0, 0]], dtype=float)
    path = roc_png(y, np.random.default_rng(0).random((4, 2)), ["a", "b"], tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recall_at_k():
    sim = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.3, 0.2, 0.1]])  # ranks 0, 1, 2
    r = recall_at_k(sim, ks=(1, 2))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}


def test_retrieval_of_100000_studies_finds_the_nearest_neighbour(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((100_000, 64)).astype(np.float32)
    ids = [f"study-{i}" for i in range(len(emb))]
    EmbeddingIndex.build(emb, ids).save(tmp_path / "index")
    index = EmbeddingIndex.load(tmp_path / "index")
    targets = rng.integers(0, len(emb), 20)
    queries = emb[targets] + rng.standard_normal((20, 64)).astype(np.float32) * 0.05
    hits = index.search(queries, k=5)
    normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for q, t, h in zip(queries, targets, hits):
        exact = np.argsort(-(normed @ (q / np.linalg.norm(q))))[:5]
        assert h[0][0] == f"study-{t}"
        assert [sid for sid, _ in h] == [ids[i] for i in exact]
        assert h[0][1] == pytest.approx(float(normed[t] @ (q / np.linalg.norm(q))), abs=2e-3)
    same = index.search(emb[:3], k=3, exclude=ids[:3])
    assert all(hit[0][0] != ids[i] for i, hit in enumerate(same))
    with pytest.raises(KeyError, match="not in the index"):
        index.vector("nobody")


def test_prompt_sets_match_the_public_label_files():
    assert set(benchmark_names()) >= {"ct-rate", "rad-chestct", "pub-brain-5", "cq500", "rsna-ich"}
    import csv

    labels = ct_rate_labels_csv()
    header = next(csv.reader(open(labels)))
    ct = load_prompt_set("ct-rate")
    assert [f.column for f in ct.findings] == header[1:]
    assert ct.id_column == header[0] and len(ct.findings) == 18
    assert all(f.negative for f in ct.findings)
    assert load_prompt_set("pub-brain-5").mode == "multiclass"


def test_free_text_findings_are_checked():
    f = findings_from_text(["  intracranial   haemorrhage "])[0]
    assert (f.positive, f.negative) == ("intracranial haemorrhage", "no intracranial haemorrhage")
    with pytest.raises(ValueError, match="finding 1 is empty"):
        findings_from_text(["mass", " "])
    with pytest.raises(ValueError, match="limit is 300"):
        findings_from_text(["x" * 301])
    with pytest.raises(KeyError, match="unknown prompt set"):
        load_prompt_set("mimic")


@pytest.mark.parametrize("positive, negative, problem", [
    ([], "no mass", "positive prompt of []"),
    ("mass", ["no mass", ""], "negative prompt of ['no mass', '']"),
    (3, "no mass", "positive prompt of 3"),
    (None, "no mass", "positive prompt of None"),
])
def test_a_prompt_set_with_a_bad_phrasing_is_refused_naming_the_finding(tmp_path, positive, negative, problem):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"name": "x", "findings": [{"name": "mass", "positive": positive, "negative": negative}]}))
    with pytest.raises(ValueError, match=re.escape(f"finding 'mass' has a {problem}")):
        load_prompt_set(path)


def test_a_prompt_set_keeps_one_phrasing_as_text_and_several_as_an_ensemble(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"name": "x", "mode": "multiclass", "findings": [
        {"name": "a", "positive": ["glioma"]}, {"name": "b", "positive": ["meningioma", "extra-axial mass"]}]}))
    a, b = load_prompt_set(path).findings
    assert (a.positive, a.negative) == ("glioma", None)
    assert b.positive == ("meningioma", "extra-axial mass")


def clustered(n: int, dim: int = 64, clusters: int = 200, seed: int = 1):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    emb = centers[rng.integers(0, clusters, n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    queries = centers[rng.integers(0, clusters, 30)] + 0.4 * rng.standard_normal((30, dim)).astype(np.float32)
    return emb, queries, [f"s{i}" for i in range(n)]


def test_faiss_search_finds_what_exact_search_finds_reading_a_fraction(tmp_path):
    emb, queries, ids = clustered(20_000)
    index = EmbeddingIndex.build(emb, ids)
    with pytest.raises(ValueError, match="build_ann"):
        index.search(queries[:1], k=10, approximate=True)
    exact = index.search(queries, k=10)
    index.build_ann(lists=100, nprobe=4)
    assert index.ann.ntotal == len(emb) and index.ann_params["kind"] == "IVF-SQ8"
    sizes = np.sort([index.ann.invlists.list_size(i) for i in range(100)])
    assert sizes[-4:].sum() < 0.15 * len(emb)  # 4 lists are a small part of the index
    approx = index.search(queries, k=10)  # the FAISS index is used once built
    recall = np.mean([len({a for a, _ in x} & {e for e, _ in y}) / 10 for x, y in zip(approx, exact)])
    assert recall >= 0.95, f"recall@10 of the approximate search {recall:.2f}"
    for x, y in zip(approx, exact):  # re-scored exactly: the same cosines
        want = dict(y)
        assert all(abs(s - want[sid]) < 1e-6 for sid, s in x if sid in want)
    assert index.search(queries, k=10, approximate=False) == exact
    one = index.search(queries[:1], k=3, exclude=[approx[0][0][0]])[0]
    assert len(one) == 3 and approx[0][0][0] not in {sid for sid, _ in one}
    assert index.search(queries[:1], k=50_000)[0][0] == approx[0][0]  # k past the row count: every row it finds


def test_the_faiss_index_is_saved_with_its_side_file_and_loads_back(tmp_path):
    emb, queries, ids = clustered(5_000)
    index = EmbeddingIndex.build(emb, ids)
    index.build_ann(lists=40, nprobe=8, embedding="reports")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "ivf.npz").write_bytes(b"old")  # inverted lists of an earlier version: removed
    index.save(tmp_path / "index")
    assert not (tmp_path / "index" / "ivf.npz").exists()
    side = json.loads((tmp_path / "index" / "faiss.json").read_text())
    assert {k: side[k] for k in ("kind", "dim", "count", "embedding", "lists", "nprobe")} == \
        {"kind": "IVF-SQ8", "dim": 64, "count": 5_000, "embedding": "reports", "lists": 40, "nprobe": 8}
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.ann is not None and loaded.ann.ntotal == 5_000 and loaded.ann_params["nprobe"] == 8
    assert loaded.search(queries, k=5) == index.search(queries, k=5)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["embeddings.npy", "faiss.index", "faiss.json", "ids.json"]
    # the same rows again, without a FAISS index: the stale one is removed, not kept beside other rows
    EmbeddingIndex.build(emb[:100], ids[:100]).save(tmp_path / "index")
    assert EmbeddingIndex.load(tmp_path / "index").ann is None and not (tmp_path / "index" / "faiss.index").exists()


def test_a_corrupt_or_mismatched_faiss_index_is_refused_by_name(tmp_path):
    import shutil

    emb, _, ids = clustered(3_000)
    index = EmbeddingIndex.build(emb, ids)
    index.build_ann(lists=20, embedding="findings")
    good = index.save(tmp_path / "good")
    (good / "export.json").write_text(json.dumps({"embedding": "findings"}))
    assert EmbeddingIndex.load(good).ann is not None

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        with pytest.raises(ValueError) as e:
            EmbeddingIndex.load(folder)
        assert EmbeddingIndex.load(folder, approximate=False).ann is None  # the rows stay usable
        return str(e.value)

    data = (good / "faiss.index").read_bytes()
    msg = variant("truncated", lambda f: (f / "faiss.index").write_bytes(data[: len(data) // 2]))
    assert "faiss.index is not a readable FAISS index" in msg and "rebuild" in msg and ".cpp" not in msg
    assert "not a readable FAISS index" in variant("garbage", lambda f: (f / "faiss.index").write_bytes(b"\0" * 100))
    assert "faiss.json is not a readable" in variant("side", lambda f: (f / "faiss.json").write_text("{"))
    assert "only one is there" in variant("alone", lambda f: (f / "faiss.json").unlink())
    def other_rows(folder):  # the FAISS files of 3,000 rows beside 2,000 others
        EmbeddingIndex.build(emb[:2_000] + 1, ids[1_000:]).save(folder)
        for name in ("faiss.index", "faiss.json"):
            shutil.copy(good / name, folder / name)

    msg = variant("rows", other_rows)
    assert "does not match the embeddings beside it" in msg and "count 3000 but the index has 2000" in msg and "other study ids" in msg
    msg = variant("kind", lambda f: (f / "export.json").write_text(json.dumps({"embedding": "reports"})))
    assert "embedding 'findings' but export.json says 'reports'" in msg


def test_relevance_of_every_finding_from_one_pass_equals_a_full_backward_per_finding():
    import torch.nn.functional as F

    import hlip_core
    from hlip_core.eval.saliency import _to_patch_grid, relevance_maps

    torch.manual_seed(0)
    model = hlip_core.create_model("tiny_multiscan_h2").eval()
    x, mask = torch.rand(1, 3, 1, 32, 64, 64), torch.tensor([[True, True, False]])
    directions = torch.randn(4, model.config["embed_dim"])
    maps, shares, z, _ = relevance_maps(model, x, mask, directions, return_embedding=True)
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode_study(x, mask)[0], rtol=1e-5, atol=1e-6)
    trunk, attn_module = model.visual.trunk, model.visual.trunk.blocks[-1].attn
    attn_module.keep_attention = True
    for f, direction in enumerate(directions):  # the plain way: forward and backward through everything
        model.zero_grad()
        prefix, _, lay = trunk.forward_tokens(x.clone().requires_grad_(True), mask)
        cls = prefix[:, 0]
        attn = attn_module.last_attention
        attn.retain_grad()
        (F.normalize(model.visual.head(cls), dim=-1)[0] @ direction).backward()
        cam = (attn.grad * attn).clamp(min=0).mean(dim=1)[:, 0, 1:].detach()
        expected = _to_patch_grid(cam, trunk.blocks[-1].level, lay, x.shape[-3:], trunk.patch_size)
        torch.testing.assert_close(maps[f], expected / expected.max(), rtol=1e-4, atol=1e-6)
        assert shares[f].shape == (2,) and float(shares[f].sum()) == pytest.approx(1.0)
    attn_module.keep_attention = False


def test_new_findings_on_a_kept_study_rerun_only_the_last_block_with_the_same_answer():
    import hlip_core
    from hlip_core.inference import PreparedScan, PreparedStudy, StudyPredictor

    torch.manual_seed(0)
    tok = hlip_core.train_wordpiece(["a mass", "no mass", "an infarct", "no infarct"], vocab_size=100, min_frequency=1)
    predictor = StudyPredictor(hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok))
    arrays = np.random.default_rng(0).random((2, 32, 64, 64), dtype=np.float32)
    study = PreparedStudy("s", [PreparedScan(f"scan{i}", "MR", "", None, a, {}) for i, a in enumerate(arrays)])
    first = predictor.predict(study, ["mass"])
    assert len(study.last_block_input) == 1
    calls = []
    hook = predictor.model.visual.trunk.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    again = predictor.predict(study, ["mass", "infarct"])
    hook.remove()
    assert calls == []  # the first block did not run again
    other = PreparedStudy("s", study.scans)
    fresh = predictor.predict(other, ["mass", "infarct"])
    for a, b in zip(again.findings, fresh.findings):
        assert (a.scan_id, a.finding) == (b.scan_id, b.finding)
        assert a.probability == pytest.approx(b.probability, abs=1e-6) and a.score == pytest.approx(b.score, abs=1e-6)
    assert again.findings[0].probability == pytest.approx(first.findings[0].probability, abs=1e-6)
    assert fresh.findings[0].probability == pytest.approx(float(predictor.score(predictor.embed(other), ["mass"])["probability"][0, 0]), abs=1e-5)
