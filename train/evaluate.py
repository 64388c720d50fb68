"""Zero-shot evaluation of a checkpoint on a public benchmark, from the benchmark's own label file.

    python train/evaluate.py --checkpoint CKPT --benchmark ct-rate \
        --data prepared/ct-rate-valid --labels valid_labels.csv [--valid-fraction 0.3]

The benchmark's volumes are first prepared with train/prepare.py (their file names become the ids
that the label file uses). Prints a table like the paper's: per finding n+/n, AUC with a bootstrap
95% interval and, when thresholds come from a validation split, balanced accuracy, F1, sensitivity
and specificity at those thresholds. The validation split is never the scored one: either a
separate prepared set (--valid-data/--valid-labels) or a part of --data held apart by study
(--valid-fraction). Writes results.json, scores.csv and roc.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by train/pretrain.py or hlip_core.save")
    p.add_argument("--benchmark", required=True,
                   help="prompt set: ct-rate, rad-chestct, pub-brain-5, cq500, rsna-ich, or a .json file of the same shape")
    p.add_argument("--data", required=True, help="prepared manifest (or its folder) of the benchmark's volumes")
    p.add_argument("--labels", required=True, help="the benchmark's label CSV as distributed")
    p.add_argument("--id-column", default=None, help="id column of the label file (default: the prompt set's)")
    p.add_argument("--valid-data", default=None, help="prepared manifest of a validation split, for thresholds (default: none)")
    p.add_argument("--valid-labels", default=None, help="label CSV of the validation split (default: none)")
    p.add_argument("--valid-fraction", type=float, default=0.0,
                   help="hold this fraction of --data apart (by study) to choose thresholds; scored on the rest (default: 0, AUC only)")
    p.add_argument("--threshold-rule", choices=("youden", "f1"), default="youden", help="threshold choice on validation (default: youden)")
    p.add_argument("--embeddings", default=None,
                   help="embedding index folder of --data from train/embed.py, reused instead of embedding again (default: OUT/embeddings)")
    p.add_argument("--out", default=None, help="output folder (default: eval_output/<benchmark>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)")
    p.add_argument("--batch-size", type=int, default=4, help="studies per forward pass (default: 4)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval, 0 = none (default: 1000)")
    p.add_argument("--allow-missing", action="store_true", help="score the labelled studies that are in --data, instead of refusing")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split and the bootstrap (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if (args.valid_data is None) != (args.valid_labels is None):
        p.error("--valid-data and --valid-labels go together")
    if args.valid_data and args.valid_fraction:
        p.error("give either a validation set (--valid-data/--valid-labels) or --valid-fraction, not both")
    return args


def embed_labelled(model, labels_table, data: str, index_dir: Path, args, fingerprint: str):
    """Embeddings for the labelled ids of a manifest: (labels restricted to what is present, [n, E], groups)."""
    from hlip_core.data.manifest import read_manifest
    from hlip_core.eval.benchmark import align, match_unit
    from hlip_core.eval.embedding import embed_manifest

    records = read_manifest(data)
    study_ids = {r["study_id"] for r in records}
    scan_to_study = {s["scan_id"]: r["study_id"] for r in records for s in r["scans"]}
    unit = match_unit(labels_table.ids, study_ids, set(scan_to_study))
    index = embed_manifest(model, data, index_dir, unit=unit, batch_size=args.batch_size, device=args.device,
                           precision=args.precision, progress=not args.quiet, fingerprint=fingerprint,
                           embedding="findings")  # zero-shot findings: token 0
    table, rows = align(labels_table, index.ids, args.allow_missing)
    embeddings = np.stack([np.asarray(index.embeddings[r], dtype=np.float32) for r in rows]) if len(rows) else None
    groups = [scan_to_study[i] if unit == "scan" else i for i in table.ids]
    log.info("%s: %d labelled %ss embedded", data, len(table.ids), unit)
    return table, embeddings, groups


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hlip_core.data.manifest import read_settings
    from hlip_core.eval import ZeroShotClassifier, load_prompt_set
    from hlip_core.eval.benchmark import read_labels, split_validation
    from hlip_core.eval.metrics import choose_thresholds, classification_table, format_table, roc_png
    from hlip_core.model import load

    prompt_set = load_prompt_set(args.benchmark)
    out = Path(args.out or Path("eval_output") / prompt_set.name)
    out.mkdir(parents=True, exist_ok=True)
    model = load(args.checkpoint, device=args.device)
    ckpt = Path(args.checkpoint).resolve()
    fingerprint = f"{ckpt}:{(ckpt / 'model.safetensors').stat().st_mtime_ns}"
    trained_with, prepared_with = model.config.get("preprocess"), read_settings(args.data)
    if trained_with and prepared_with and trained_with != prepared_with:
        differ = sorted(k for k in set(trained_with) | set(prepared_with) if trained_with.get(k) != prepared_with.get(k))
        log.warning("the data was prepared with other settings than the model was trained with (%s); scores may suffer",
                    ", ".join(differ))

    test_labels = read_labels(args.labels, prompt_set, args.id_column)
    test, z_test, groups = embed_labelled(model, test_labels, args.data, Path(args.embeddings or out / "embeddings"), args, fingerprint)
    valid, z_valid = None, None
    if args.valid_data:
        valid_labels = read_labels(args.valid_labels, prompt_set, args.id_column)
        valid, z_valid, _ = embed_labelled(model, valid_labels, args.valid_data, out / "embeddings-valid", args, fingerprint)
        if set(valid.ids) & set(test.ids):
            raise SystemExit(f"the validation and test sets share {len(set(valid.ids) & set(test.ids))} ids; they must be disjoint")
    elif args.valid_fraction:
        vrows, trows = split_validation(test.ids, args.valid_fraction, args.seed, groups)
        valid, z_valid = test.subset(vrows), z_test[vrows]
        test, z_test = test.subset(trows), z_test[trows]

    classifier = ZeroShotClassifier(model, templates=prompt_set.templates)
    with torch.no_grad():
        scores = classifier.scores(torch.from_numpy(z_test), prompt_set.findings, mode=prompt_set.mode)["probability"].numpy()
        valid_scores = None
        if valid is not None:
            valid_scores = classifier.scores(torch.from_numpy(z_valid), prompt_set.findings, mode=prompt_set.mode)["probability"].numpy()
    thresholds = choose_thresholds(valid.labels, valid_scores, valid.names, args.threshold_rule) if valid is not None else None
    rows = classification_table(test.labels, scores, test.names, thresholds, n_boot=args.bootstrap, seed=args.seed)
    split = (f"{len(test.ids)} studies scored; thresholds ({args.threshold_rule}) from {len(valid.ids)} validation studies"
             if valid is not None else f"{len(test.ids)} studies scored; no validation split, so AUC only")
    title = f"{prompt_set.name}: zero-shot, {Path(args.checkpoint).name} ({split})"
    print(format_table(rows, title))
    result = {"benchmark": prompt_set.name, "checkpoint": str(args.checkpoint), "scored": len(test.ids),
              "validation": len(valid.ids) if valid is not None else 0, "threshold_rule": args.threshold_rule if valid is not None else None,
              "findings": [vars(r) for r in rows],
              "macro_auc": float(np.nanmean([r.auc for r in rows]))}
    if prompt_set.mode == "multiclass":
        from sklearn.metrics import balanced_accuracy_score

        truth, pred = np.nanargmax(test.labels, axis=1), scores.argmax(axis=1)
        result["accuracy"] = float((truth == pred).mean())
        result["balanced_accuracy"] = float(balanced_accuracy_score(truth, pred))
        print(f"{len(test.names)}-way top-1 accuracy {result['accuracy']:.3f}, balanced accuracy {result['balanced_accuracy']:.3f}")
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    with open(out / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id"] + [f"{n} (probability)" for n in test.names] + [f"{n} (label)" for n in test.names])
        for i, sid in enumerate(test.ids):
            w.writerow([sid] + [f"{v:.6f}" for v in scores[i]] + ["" if np.isnan(v) else int(v) for v in test.labels[i]])
    roc_png(test.labels, scores, test.names, out / "roc.png", title=f"{prompt_set.name} zero-shot")
    print(f"macro AUC {result['macro_auc']:.3f}; results, scores and ROC curves in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"evaluate: {exc}")
