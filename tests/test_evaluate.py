"""train/evaluate.py and train/embed.py on prepared manifests of held-out planted-lesion studies,
and the benchmark label readers on the real CT-RATE label file."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import hlip_core
from hlip_core.eval import load_prompt_set
from hlip_core.eval.benchmark import bare_id, read_labels, split_validation
from hlip_core.eval.retrieval import EmbeddingIndex
from realdata import CT_RATE_EXCERPT_ROWS, ct_rate_labels_csv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import embed as embed_cli  # noqa: E402
import evaluate as evaluate_cli  # noqa: E402

PROMPTS = {
    "name": "planted-lesion", "mode": "binary", "id_column": "study", "templates": ["{}"],
    "findings": [{"name": "Bright lesion", "column": "lesion", "positive": "bright lesion", "negative": "no bright lesion"}],
}


def write_manifest(folder: Path, x: np.ndarray, prefix: str = "s") -> list[str]:
    """A prepared archive of studies x [n, N, 1, D, H, W] in [0, 1], as the ingestion writes it."""
    (folder / "arrays").mkdir(parents=True)
    ids, lines = [], []
    for i, study in enumerate(x):
        sid = f"{prefix}{i:03d}"
        scans = []
        for k, vol in enumerate(study[:, 0]):
            rel = f"arrays/{sid}_scan{k}.npy"
            np.save(folder / rel, np.round(vol * 255).astype(np.uint8))
            scans.append({"scan_id": f"{sid}_scan{k}", "path": rel, "shape": list(vol.shape), "dtype": "uint8",
                          "modality": "MR", "description": f"scan {k}"})
        lines.append(json.dumps({"study_id": sid, "scans": scans, "report": None, "sentences": []}))
        ids.append(sid)
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return ids


def write_labels(path: Path, ids, labels, column="lesion", id_column="study", suffix=""):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([id_column, column])
        for sid, y in zip(ids, labels):
            w.writerow([sid + suffix, int(y)])
    return path


@pytest.fixture(scope="module")
def checkpoint(lesion_model, tmp_path_factory):
    return hlip_core.save(lesion_model, tmp_path_factory.mktemp("ckpt") / "lesion")


@pytest.fixture(scope="module")
def benchmark(held_out, tmp_path_factory):
    x, y, _ = held_out
    root = tmp_path_factory.mktemp("bench")
    ids = write_manifest(root / "prepared", x.numpy())
    prompts = root / "planted.json"
    prompts.write_text(json.dumps(PROMPTS))
    return {"root": root, "data": root / "prepared", "ids": ids, "y": y, "prompts": prompts,
            "labels": write_labels(root / "labels.csv", ids, y)}


def run_evaluate(checkpoint, bench, out, *extra):
    argv = ["--checkpoint", str(checkpoint), "--benchmark", str(bench["prompts"]), "--data", str(bench["data"]),
            "--labels", str(bench["labels"]), "--out", str(out), "--bootstrap", "100", "--quiet", *map(str, extra)]
    assert evaluate_cli.main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_evaluate_prints_the_table_and_beats_chance_on_held_out_studies(checkpoint, benchmark, tmp_path, capsys):
    result = run_evaluate(checkpoint, benchmark, tmp_path / "out")
    printed = capsys.readouterr().out
    assert "Bright lesion" in printed and "macro" in printed and "AUC only" in printed
    assert result["scored"] == len(benchmark["ids"]) and result["validation"] == 0
    assert result["macro_auc"] > 0.75
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    assert [r["id"] for r in rows] == benchmark["ids"]
    assert (tmp_path / "out" / "roc.png").stat().st_size > 1000


def test_thresholds_come_from_the_validation_part_and_never_from_the_scored_labels(checkpoint, benchmark, tmp_path):
    first = run_evaluate(checkpoint, benchmark, tmp_path / "a", "--valid-fraction", "0.4")
    assert first["validation"] + first["scored"] == len(benchmark["ids"])
    assert not np.isnan(first["findings"][0]["balanced_accuracy"])
    valid_rows, test_rows = split_validation(benchmark["ids"], 0.4, 0)
    # flip the labels of the scored studies only: the thresholds must not move
    flipped = np.array(benchmark["y"]).copy()
    flipped[test_rows] = 1 - flipped[test_rows]
    other = dict(benchmark, labels=write_labels(tmp_path / "flipped.csv", benchmark["ids"], flipped))
    second = run_evaluate(checkpoint, other, tmp_path / "b", "--valid-fraction", "0.4", "--embeddings", tmp_path / "a" / "embeddings")
    assert second["findings"][0]["threshold"] == first["findings"][0]["threshold"]
    assert second["findings"][0]["auc"] == pytest.approx(1 - first["findings"][0]["auc"])


def test_labels_by_volume_file_name_are_matched_to_scans(checkpoint, benchmark, tmp_path):
    scan_ids = [f"{sid}_scan0" for sid in benchmark["ids"]]
    bench = dict(benchmark, labels=write_labels(tmp_path / "scans.csv", scan_ids, benchmark["y"], suffix=".nii.gz"))
    result = run_evaluate(checkpoint, bench, tmp_path / "out")
    assert result["scored"] == len(scan_ids)
    index = EmbeddingIndex.load(tmp_path / "out" / "embeddings")
    assert index.ids[0] == "s000_scan0" and len(index) == 2 * len(benchmark["ids"])  # every scan embedded alone


def test_labelled_studies_missing_from_the_data_are_named(checkpoint, benchmark, tmp_path):
    bench = dict(benchmark, labels=write_labels(tmp_path / "more.csv", benchmark["ids"] + ["s999"], list(benchmark["y"]) + [1]))
    with pytest.raises(ValueError, match=r"1 labelled studies are not in the data \(e.g. \['s999'\]\).*--allow-missing"):
        run_evaluate(checkpoint, bench, tmp_path / "out")
    assert run_evaluate(checkpoint, bench, tmp_path / "out2", "--allow-missing")["scored"] == len(benchmark["ids"])


def test_embed_resumes_after_the_chunks_it_finished(checkpoint, benchmark, tmp_path, caplog):
    out = tmp_path / "emb"
    argv = ["--checkpoint", str(checkpoint), "--data", str(benchmark["data"]), "--out", str(out), "--chunk", "16", "--quiet"]
    assert embed_cli.main(argv) == 0
    first = EmbeddingIndex.load(out, mmap=False)
    assert first.ids == benchmark["ids"]
    # as if killed during the last chunk: its part and the joined index are not there
    parts = sorted((out / "parts").glob("*.npz"))
    assert len(parts) == 3
    parts[-1].unlink()
    (out / "embeddings.npy").unlink()
    caplog.set_level("INFO")
    assert embed_cli.main(argv) == 0
    assert "32 of 48 items already embedded" in caplog.text
    again = EmbeddingIndex.load(out, mmap=False)
    assert again.ids == first.ids
    np.testing.assert_array_equal(again.embeddings, first.embeddings)
    with pytest.raises(ValueError, match="other settings.*chunk"):
        embed_cli.main(argv[:-3] + ["--chunk", "8", "--quiet"])


def test_the_real_ct_rate_label_file_reads_as_distributed():
    table = read_labels(ct_rate_labels_csv(), load_prompt_set("ct-rate"))
    assert len(table.ids) == CT_RATE_EXCERPT_ROWS and table.labels.shape == (CT_RATE_EXCERPT_ROWS, 18)
    assert table.ids[0] == "valid_1_a_1" and set(np.unique(table.labels)) <= {0.0, 1.0}
    assert table.names[2] == "Cardiomegaly"


def test_readers_vote_and_bad_cells_are_named(tmp_path):
    cq = load_prompt_set("cq500")
    header = ["name"] + [f"{r}:{f.column}" for f in cq.findings for r in cq.readers]
    path = tmp_path / "reads.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerow(["CQ500-CT-1"] + [1, 1, 0] + [0, 0, 1] * (len(cq.findings) - 1))
    table = read_labels(path, cq)
    assert table.labels[0, 0] == 1 and (table.labels[0, 1:] == 0).all()
    bad = tmp_path / "bad.csv"
    bad.write_text(path.read_text().replace("CQ500-CT-1,1", "CQ500-CT-1,yes"))
    with pytest.raises(ValueError, match=r"bad.csv:2 column 'R1:ICH': 'yes' is not a 0/1 label"):
        read_labels(bad, cq)
    with pytest.raises(ValueError, match="needs column"):
        read_labels(ct_rate_labels_csv(), cq, id_column="VolumeName")
    assert bare_id(" valid_1_a_1.nii.gz ") == "valid_1_a_1"


def test_validation_split_keeps_groups_together():
    ids = [f"v{i}" for i in range(20)]
    groups = [f"patient{i // 2}" for i in range(20)]
    valid, test = split_validation(ids, 0.3, seed=1, groups=groups)
    assert sorted(valid + test) == list(range(20))
    assert not {groups[i] for i in valid} & {groups[i] for i in test}
    assert split_validation(ids, 0.3, seed=1, groups=groups) == (valid, test)
