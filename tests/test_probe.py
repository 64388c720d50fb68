"""Linear probes on frozen study embeddings (hlip_core.eval.probe, train/probe.py, --conf probe).

Learning is judged on held-out studies only: synthetic embeddings whose label is linearly decodable
(and the same with shuffled labels, which must stay near chance), then train/probe.py end to end on
prepared manifests of planted-lesion studies (its wiring: splits, files, the numbers it reports).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hlip_core
from hlip_core.eval.probe import (LinearProbe, checkpoint_fingerprint, evaluate_probe, field_split, fit_probe,
                                  held_out_split, manifest_labels)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))
import probe as probe_cli  # noqa: E402


def synthetic(n: int, dim: int = 32, seed: int = 0, shuffle: bool = False):
    """L2-normalised embeddings [n, dim] and labels [n, 2]: 'a' is the sign of one direction plus
    noise, 'b' of another; with ``shuffle`` the labels are permuted (no signal left)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, dim))
    y = np.stack([(z[:, 0] + 0.3 * rng.normal(size=n)) > 0, (z[:, 1] - z[:, 2] + 0.3 * rng.normal(size=n)) > 0.5], 1).astype(float)
    if shuffle:
        y = y[rng.permutation(n)]
    return z / np.linalg.norm(z, axis=1, keepdims=True), y


def test_a_linearly_decodable_label_is_found_on_held_out_studies_and_shuffled_labels_are_not():
    z, y = synthetic(600, seed=1)
    held = held_out_split([f"s{i}" for i in range(len(z))], 0.3, seed=0)
    probe = fit_probe(z[~held], y[~held], ["a", "b"])
    result = evaluate_probe(probe, z[held], y[held], ["a", "b"], n_boot=200, seed=0)
    for name in ("a", "b"):
        r = result["findings"][name]
        assert r["auc"] > 0.9, result
        assert r["ci_low"] <= r["auc"] <= r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.1
        assert r["studies"] == int(held.sum())
    assert result["macro_auc"] == pytest.approx(np.mean([result["findings"][n]["auc"] for n in "ab"]))

    z, y = synthetic(600, seed=1, shuffle=True)
    shuffled = evaluate_probe(fit_probe(z[~held], y[~held], ["a", "b"]), z[held], y[held], ["a", "b"], n_boot=200)
    assert abs(shuffled["macro_auc"] - 0.5) < 0.1, shuffled


def test_the_bootstrap_interval_is_seeded_and_the_split_depends_on_ids_only():
    z, y = synthetic(300, seed=2)
    probe = fit_probe(z[:200], y[:200], ["a", "b"])
    one, two = (evaluate_probe(probe, z[200:], y[200:], ["a", "b"], n_boot=100, seed=s) for s in (5, 5))
    assert one == two
    other = evaluate_probe(probe, z[200:], y[200:], ["a", "b"], n_boot=100, seed=6)
    assert other["findings"]["a"]["ci_low"] != one["findings"]["a"]["ci_low"]
    ids = [f"study-{i}" for i in range(400)]
    split = held_out_split(ids, 0.25, seed=3)
    assert 0.18 < split.mean() < 0.32
    assert (held_out_split(ids[::-1], 0.25, seed=3)[::-1] == split).all()  # order does not matter
    assert (held_out_split(ids[:50], 0.25, seed=3) == split[:50]).all()  # nor the other studies
    assert not (held_out_split(ids, 0.25, seed=4) == split).all()


def test_the_probe_is_the_regression_on_the_embedding_itself_and_round_trips_as_json(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    z, y = synthetic(200, seed=3)
    probe = fit_probe(z, y, ["a", "b"], C=0.5, fingerprint="f" * 64)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000)).fit(z, y[:, 1].astype(int))
    assert np.allclose(probe.probabilities(z, ["b"])[:, 0], reference.predict_proba(z)[:, 1], atol=1e-6)

    path = probe.save(tmp_path / "p.probe.json")
    assert [p.name for p in tmp_path.iterdir()] == ["p.probe.json"]  # no temporary file left
    doc = json.loads(path.read_text())
    assert doc["format"] == "hlip-linear-probe" and doc["embed_dim"] == 32 and doc["embedding"] == "findings"
    back = LinearProbe.load(path, fingerprint="f" * 64, embed_dim=32)
    assert back.names == ["a", "b"] and np.array_equal(back.weights, probe.weights) and np.array_equal(back.bias, probe.bias)
    assert np.array_equal(back.probabilities(z), probe.probabilities(z))
    assert np.array_equal(back.probabilities(z, ["b", "a"]), probe.probabilities(z)[:, ::-1])


def test_a_probe_file_is_refused_with_a_reason_when_it_does_not_fit(tmp_path):
    z, y = synthetic(100, seed=4)
    path = fit_probe(z, y, ["a", "b"], fingerprint="f" * 64).save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="another checkpoint"):
        LinearProbe.load(path, fingerprint="0" * 64)
    with pytest.raises(ValueError, match="width 32; this model's are 64"):
        LinearProbe.load(path, embed_dim=64)
    probe = LinearProbe.load(path)
    with pytest.raises(ValueError, match=r"no finding \['c'\]"):
        probe.probabilities(z, ["c"])
    with pytest.raises(ValueError, match=r"embeddings \[n, 32\]"):
        probe.probabilities(z[:, :16])

    doc = json.loads(path.read_text())
    cases = {
        "not a linear probe": {"format": "something else"},
        "format version": {"version": 99},
        "2 findings but weights": {"bias": [0.0]},
        "embedding 'pooled'": {"embedding": "pooled"},
        "distinct non-empty": {"names": ["a", "a"]},
        "not all finite": {"bias": [float("nan"), 0.0]},
    }
    for message, change in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**doc, **change}))
        with pytest.raises(ValueError, match=message):
            LinearProbe.load(bad)
    (tmp_path / "cut.json").write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match="not a readable probe file"):
        LinearProbe.load(tmp_path / "cut.json")


def test_a_finding_with_one_class_in_training_is_skipped_and_said_so():
    z, y = synthetic(120, seed=5)
    y = np.concatenate([y, np.zeros((len(y), 1))], 1)  # 'rare': no positive study in training
    probe = fit_probe(z, y, ["a", "b", "rare"])
    assert probe.names == ["a", "b"] and "0 positive of 120" in probe.skipped["rare"]
    result = evaluate_probe(probe, z, y, ["a", "b", "rare"], n_boot=50)
    assert "both classes" in result["findings"]["rare"]["skipped"]
    assert not math.isnan(result["macro_auc"])
    with pytest.raises(ValueError, match="no finding can be fitted"):
        fit_probe(z, y[:, 2:], ["rare"])


def test_labels_come_from_the_manifest_with_unknowns_kept_apart():
    records = [{"study_id": "s1", "labels": {"mass": 1, "bleed": 0}}, {"study_id": "s2", "labels": {"mass": 0}},
               {"study_id": "s3", "labels": {"mass": True, "bleed": 1.0}}]
    names, y = manifest_labels(records)
    assert names == ["bleed", "mass"]
    assert np.array_equal(y, np.array([[0, 1], [np.nan, 0], [1, 1]]), equal_nan=True)
    assert manifest_labels(records, ["mass"])[0] == ["mass"]
    with pytest.raises(ValueError, match=r"no study of the manifest has a label for \['oedema'\]"):
        manifest_labels(records, ["oedema"])
    with pytest.raises(ValueError, match="label 'mass' is 'yes', not 0 or 1"):
        manifest_labels([{"study_id": "s4", "labels": {"mass": "yes"}}])
    with pytest.raises(ValueError, match="the manifest has no labels"):
        manifest_labels([{"study_id": "s5"}])
    with pytest.raises(ValueError, match="has no field 'split'"):
        field_split(records, "split", ["test"])
    assert field_split([{"study_id": "a", "split": "test"}, {"study_id": "b", "split": "train"}], "split", ["test"]).tolist() == [True, False]


# -- train/probe.py end to end ------------------------------------------------------------------


def write_labelled_manifest(folder: Path, x: np.ndarray, labels, prefix: str, split: str | None = None) -> Path:
    """A prepared folder (uint8 arrays + manifest.jsonl with "labels") of studies x [n, N, 1, D, H, W] in [0, 1]."""
    (folder / "arrays").mkdir(parents=True)
    lines = []
    for i, study in enumerate(x):
        sid, scans = f"{prefix}{i:03d}", []
        for k, vol in enumerate(study[:, 0]):
            rel = f"arrays/{sid}_scan{k}.npy"
            np.save(folder / rel, np.round(vol * 255).astype(np.uint8))
            scans.append({"scan_id": f"{sid}_scan{k}", "path": rel, "shape": list(vol.shape), "dtype": "uint8", "modality": "MR"})
        record = {"study_id": sid, "scans": scans, "report": None, "sentences": [], "labels": {"lesion": int(labels[i])}}
        if split:
            record["split"] = split
        lines.append(json.dumps(record))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def planted_studies(n: int, seed: int, grid=(32, 64, 64)):
    """x [n, 2, 1, D, H, W] in [0, 1] (smooth noise, a bright box in one scan of the positives), labels [n]."""
    from planted import smooth_noise

    rng = np.random.default_rng(seed)
    x = np.stack([[smooth_noise(rng, grid) for _ in range(2)] for _ in range(n)])
    y = (np.arange(n) % 2 == 0).astype(int)
    for i in np.flatnonzero(y):
        z0, y0, x0 = (int(rng.integers(0, g - 8)) for g in grid)
        x[i, int(rng.integers(0, 2)), z0 : z0 + 8, y0 : y0 + 16, x0 : x0 + 16] = 1.0
    return x[:, :, None], y


@pytest.fixture(scope="module")
def lesion_data(tmp_path_factory):
    """An untrained tiny model (the CLI's wiring and numbers are checked; learning is the synthetic test's)
    and prepared training and held-out manifests of planted-lesion studies."""
    from server_helpers import make_checkpoint

    root = tmp_path_factory.mktemp("probe")
    x, y = planted_studies(40, seed=777)
    xh, yh = planted_studies(24, seed=778)
    return {"checkpoint": make_checkpoint(root / "model"), "train": write_labelled_manifest(root / "train", x, y, "t"),
            "test": write_labelled_manifest(root / "test", xh, yh, "h"), "y_test": yh, "root": root}


def test_train_probe_fits_on_one_manifest_and_reports_the_saved_probes_held_out_auc(lesion_data, tmp_path, capsys):
    out, results = tmp_path / "lesion.probe.json", tmp_path / "results.json"
    argv = ["--checkpoint", lesion_data["checkpoint"], "--data", lesion_data["train"], "--held-out-data", lesion_data["test"],
            "--out", out, "--results", results, "--bootstrap", "200", "--batch-size", "16"]
    assert probe_cli.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(results.read_text())
    row = summary["findings"]["lesion"]
    assert row["studies"] == 24 and row["positive"] == 12 and row["ci_low"] <= row["auc"] <= row["ci_high"], summary
    assert f"{row['auc']:.3f}" in printed and "macro AUC" in printed

    probe = LinearProbe.load(out, fingerprint=checkpoint_fingerprint(lesion_data["checkpoint"]), embed_dim=lesion_data_dim(lesion_data))
    assert probe.info["studies"] == {"train": 40, "held_out": 24}
    # the reported AUC is the saved probe's on the held-out studies' findings embeddings
    from sklearn.metrics import roc_auc_score

    from hlip_core.eval.embedding import embed_items, manifest_items

    model = hlip_core.load(lesion_data["checkpoint"])
    z = embed_items(model, manifest_items(lesion_data["test"]), batch_size=16, embedding="findings")
    assert roc_auc_score(lesion_data["y_test"], probe.probabilities(z)[:, 0]) == pytest.approx(row["auc"], abs=1e-6)


def lesion_data_dim(data) -> int:
    return int(json.loads((Path(data["checkpoint"]) / "config.json").read_text())["config"]["embed_dim"])


def test_train_probe_splits_by_a_manifest_field_and_writes_beside_the_checkpoint(lesion_data, tmp_path):
    x, y = planted_studies(40, seed=779)
    both = tmp_path / "both"
    write_labelled_manifest(both, x, y, "a", split="train")
    with open(both / "manifest.jsonl") as fh:
        lines = fh.read().splitlines()
    lines = [line.replace('"split": "train"', '"split": "test"') if i % 4 == 0 else line for i, line in enumerate(lines)]
    (both / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    checkpoint = Path(lesion_data["checkpoint"])
    results = tmp_path / "r.json"
    argv = ["--checkpoint", str(checkpoint), "--data", str(both), "--split-field", "split", "--results", str(results),
            "--bootstrap", "50", "--batch-size", "16"]
    assert probe_cli.main(argv) == 0
    beside = checkpoint.parent / f"{checkpoint.name}.probe.json"
    assert LinearProbe.load(beside).info["studies"] == {"train": 30, "held_out": 10}
    assert json.loads(results.read_text())["findings"]["lesion"]["studies"] == 10


def test_train_probe_refuses_bad_input_with_a_clear_message(lesion_data, tmp_path, capsys):
    common = ["--checkpoint", str(lesion_data["checkpoint"]), "--bootstrap", "10"]
    with pytest.raises(ValueError, match="no study of the manifest has a label for"):
        probe_cli.main(common + ["--data", str(lesion_data["train"]), "--findings", "oedema"])
    with pytest.raises(ValueError, match="share 40 study ids"):
        probe_cli.main(common + ["--data", str(lesion_data["train"]), "--held-out-data", str(lesion_data["train"])])
    with pytest.raises(ValueError, match="has no field 'split'"):
        probe_cli.main(common + ["--data", str(lesion_data["train"]), "--split-field", "split"])
    with pytest.raises(SystemExit):
        probe_cli.parse_args(["--checkpoint", "c", "--data", "d", "--held-out", "1.5"])
    # as a command: a non-zero exit and the reason, no traceback
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "probe.py"), *common, "--data", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "probe: no manifest at" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(SystemExit) as done:
        probe_cli.parse_args(["--help"])
    assert done.value.code == 0 and "--held-out-data" in capsys.readouterr().out


# -- the server's --conf probe ------------------------------------------------------------------


def test_the_server_refuses_a_probe_it_cannot_use_and_says_why(lesion_data, tmp_path):
    from hlip_core.inference import StudyPredictor
    from monailabel_app.lib.configs import HLIPConfig
    from monailabel_app.lib.infers.hlip_findings import load_probe, probe_info

    checkpoint = lesion_data["checkpoint"]
    conf = {"checkpoint": str(checkpoint), "cache_dir": str(tmp_path / "cache")}
    assert HLIPConfig.from_conf(conf, "studies").probe is None
    with pytest.raises(ValueError, match="--conf probe .*no such probe file"):
        HLIPConfig.from_conf({**conf, "probe": str(tmp_path / "missing.json")}, "studies")
    predictor = StudyPredictor.load(checkpoint)
    dim = int(predictor.model.config["embed_dim"])
    rng = np.random.default_rng(0)
    right = LinearProbe(["mass"], rng.normal(size=(1, dim)), np.zeros(1), "findings", checkpoint_fingerprint(checkpoint))
    cases = {"another checkpoint": LinearProbe(["mass"], right.weights, right.bias, "findings", "0" * 64),
             f"width {dim + 1}; this model's are {dim}": LinearProbe(["mass"], rng.normal(size=(1, dim + 1)), np.zeros(1), "findings",
                                                                    right.fingerprint)}
    for message, probe in cases.items():
        config = HLIPConfig.from_conf({**conf, "probe": str(probe.save(tmp_path / "bad.probe.json"))}, "studies")
        with pytest.raises(ValueError, match=f"--conf probe: .*{message}"):
            load_probe(config, predictor)
    config = HLIPConfig.from_conf({**conf, "probe": str(right.save(tmp_path / "right.probe.json"))}, "studies")
    loaded = load_probe(config, predictor)
    assert loaded.names == ["mass"] and probe_info(loaded)["held_out_macro_auc"] is None  # no NaN in a JSON answer
    assert probe_info(None) is None
