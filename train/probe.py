"""Fit a linear probe on frozen study embeddings of a prepared, labelled manifest.

    python train/probe.py --checkpoint CKPT --data prepared/ [--findings mass haemorrhage] [--out CKPT.probe.json]
    python train/probe.py --checkpoint CKPT --data train/prepared --held-out-data test/prepared
    python train/probe.py --checkpoint CKPT --data prepared/ --split-field split --held-out-values test

Every study is embedded once with the checkpoint's findings embedding (token 0, as zero-shot
findings use). The studies are split into a training part and a held-out part, in one of three
ways: a deterministic hash of the study id and --seed (--held-out FRACTION, the default), a field
of each manifest record (--split-field/--held-out-values), or a second prepared manifest
(--held-out-data). One logistic regression per finding (scikit-learn) is fitted on the training
part only and judged on the held-out part: AUC with a bootstrap 95% interval, and the macro AUC.
Labels are the manifest's ("labels" of each study, from train/prepare.py --label-columns). A
finding with one class in the training part is skipped and said so.

The probe is written atomically as JSON (weights, biases, finding names, embedding kind, checkpoint
fingerprint; no pickle), by default beside the checkpoint folder as <folder>.probe.json; the server
adds its probabilities to the findings answer with --conf probe PATH. A summary (per-finding AUC
and interval, macro AUC) goes to stdout, and as JSON to --results when given.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

log = logging.getLogger("probe")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (train/pretrain.py, hlip_core.save, train/import_checkpoint.py, a released folder)")
    p.add_argument("--data", required=True, help="prepared manifest with labels, or the folder holding manifest.jsonl")
    p.add_argument("--findings", nargs="+", default=None, help="label columns to probe (default: every label the manifest has)")
    p.add_argument("--out", default=None, help="probe file to write (default: <checkpoint folder>.probe.json beside it)")
    split = p.add_argument_group("held-out split (one of)")
    split.add_argument("--held-out", type=float, default=0.3,
                       help="fraction of --data held out, by a hash of the study id and --seed (default: 0.3)")
    split.add_argument("--split-field", default=None, help="manifest record field that says a study's part (e.g. \"split\")")
    split.add_argument("--held-out-values", nargs="+", default=["test"],
                       help="values of --split-field that mean held out (default: test)")
    split.add_argument("--held-out-data", default=None, help="a second prepared manifest (or its folder): all of it held out, all of --data trains")
    p.add_argument("--seed", type=int, default=0, help="seed of the hashed split and of the bootstrap (default: 0)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength of the logistic regressions (default: 1.0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the held-out AUC interval (default: 1000)")
    p.add_argument("--results", default=None, help="also write the held-out summary as JSON to this file")
    p.add_argument("--batch-size", type=int, default=4, help="studies per forward pass (default: 4)")
    p.add_argument("--max-scans", type=int, default=None, help="embed at most this many scans of a study (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)")
    args = p.parse_args(argv)
    if args.split_field and args.held_out_data:
        p.error("give either --split-field or --held-out-data, not both")
    if not 0.0 < args.held_out < 1.0:
        p.error("--held-out must be between 0 and 1")
    if args.C <= 0 or args.batch_size < 1 or args.bootstrap < 1:
        p.error("--C must be positive, --batch-size and --bootstrap at least 1")
    if args.max_scans is not None and args.max_scans < 1:
        p.error("--max-scans must be at least 1")
    return args


def embed(model, data, records, args, what: str) -> np.ndarray:
    """Findings embeddings [n, E] of a manifest's records, logging progress every ~10%."""
    from hlip_core.eval.embedding import embed_items, manifest_items

    items = manifest_items(data, "study", records)
    done, step = [0], max(1, len(items) // 10)

    def progress(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // step > before // step or done[0] == len(items):
            log.info("embedded %d of %d %s studies", done[0], len(items), what)

    return embed_items(model, items, args.batch_size, args.device, args.precision, args.max_scans, on_batch=progress,
                       embedding="findings")


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hlip_core.data.manifest import read_manifest, read_settings
    from hlip_core.eval.probe import checkpoint_fingerprint, evaluate_probe, field_split, fit_probe, held_out_split, manifest_labels
    from hlip_core.model import load

    ckpt = Path(args.checkpoint).resolve()
    if not ckpt.is_dir():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such checkpoint folder")
    records = read_manifest(args.data)
    if args.held_out_data:
        held_records = read_manifest(args.held_out_data)
        shared = {r["study_id"] for r in records} & {r["study_id"] for r in held_records}
        if shared:
            raise ValueError(f"--data and --held-out-data share {len(shared)} study ids; the parts must be disjoint")
        names, train_labels = manifest_labels(records, args.findings)
        _, held_labels = manifest_labels(held_records, names)
        split = f"held-out manifest ({len(held_records)} studies)"
    else:
        names, labels = manifest_labels(records, args.findings)
        held = (field_split(records, args.split_field, args.held_out_values) if args.split_field
                else held_out_split([r["study_id"] for r in records], args.held_out, args.seed))
        if held.all() or not held.any():
            raise ValueError(f"the split of {len(records)} studies left the {'training' if held.all() else 'held-out'} part empty; "
                             "use more studies or another split")
        held_records, records = [r for r, h in zip(records, held) if h], [r for r, h in zip(records, held) if not h]
        train_labels, held_labels = labels[~held], labels[held]
        split = (f"field {args.split_field!r} in {args.held_out_values}" if args.split_field
                 else f"hash of the study id, fraction {args.held_out}, seed {args.seed}")
    log.info("%d training and %d held-out studies (%s); findings %s", len(records), len(held_records), split, names)

    fingerprint = checkpoint_fingerprint(ckpt)
    model = load(ckpt, device=args.device)
    trained_with = model.config.get("preprocess")
    for data in filter(None, (args.data, args.held_out_data)):
        prepared_with = read_settings(data)
        if trained_with and prepared_with and trained_with != prepared_with:
            differ = sorted(k for k in set(trained_with) | set(prepared_with) if trained_with.get(k) != prepared_with.get(k))
            log.warning("%s was prepared with other settings than the model was trained with (%s); the probe may suffer",
                        data, ", ".join(differ))
    z_train = embed(model, args.data, records, args, "training")
    z_held = embed(model, args.held_out_data or args.data, held_records, args, "held-out")

    probe = fit_probe(z_train, train_labels, names, C=args.C, fingerprint=fingerprint, embedding="findings")
    result = evaluate_probe(probe, z_held, held_labels, names, n_boot=args.bootstrap, seed=args.seed)
    probe.info.update({"held_out": result, "split": split, "seed": args.seed, "checkpoint_name": ckpt.name,
                       "studies": {"train": len(records), "held_out": len(held_records)}})
    out = Path(args.out) if args.out else ckpt.parent / f"{ckpt.name}.probe.json"
    probe.save(out)

    width = max(len(n) for n in names + ["macro AUC"])
    print(f"{'finding':<{width}}   AUC   95% CI         held-out studies (positive)")
    for name, r in result["findings"].items():
        if "skipped" in r:
            print(f"{name:<{width}}  skipped: {r['skipped']}")
            continue
        ci = "n/a" if math.isnan(r["ci_low"]) else f"{r['ci_low']:.3f}-{r['ci_high']:.3f}"
        print(f"{name:<{width}}  {r['auc']:.3f}  {ci:<13}  {r['studies']} ({r['positive']})")
    print(f"{'macro AUC':<{width}}  {result['macro_auc']:.3f}   ({len(records)} training, {len(held_records)} held-out studies)")
    print(f"probe written to {out}")
    if args.results:
        Path(args.results).write_text(json.dumps({**result, "probe": str(out), "split": split}, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, KeyError) as exc:
        sys.exit(f"probe: {exc}")
