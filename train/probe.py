"""Fit a linear probe on frozen study embeddings of a prepared, labelled manifest.

    python train/probe.py --checkpoint CKPT --data prepared/ [--findings mass haemorrhage] [--out CKPT.probe.json]

Every study is embedded once with the checkpoint's findings embedding (token 0, as zero-shot
findings); studies are split by study id into a training part and a held-out part (--held-out, a
deterministic hash of the id and --seed); one logistic regression per finding (scikit-learn) is
fitted on the training part and judged on the held-out part: AUC with a bootstrap 95% interval.
Labels are the manifest's ("labels" of each study, from train/prepare.py --label-columns). The probe
is written as JSON (weights, biases, finding names, embedding kind, checkpoint fingerprint; no
pickle), by default beside the checkpoint folder as <folder>.probe.json; the server applies it with
--conf probe PATH.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (train/pretrain.py, hlip_core.save, train/import_checkpoint.py)")
    p.add_argument("--data", required=True, help="prepared manifest with labels, or the folder holding manifest.jsonl")
    p.add_argument("--findings", nargs="+", default=None, help="label columns to probe (default: every label the manifest has)")
    p.add_argument("--out", default=None, help="probe file to write (default: <checkpoint folder>.probe.json beside it)")
    p.add_argument("--held-out", type=float, default=0.3, help="fraction of studies held out for judging, by study id (default: 0.3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and of the bootstrap (default: 0)")
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength of the logistic regressions (default: 1.0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the held-out AUC interval (default: 1000)")
    p.add_argument("--batch-size", type=int, default=4, help="studies per forward pass (default: 4)")
    p.add_argument("--max-scans", type=int, default=None, help="embed at most this many scans of a study (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)")
    args = p.parse_args(argv)
    if not 0.0 < args.held_out < 1.0:
        p.error("--held-out must be between 0 and 1")
    if args.C <= 0 or args.batch_size < 1 or args.bootstrap < 1:
        p.error("--C must be positive, --batch-size and --bootstrap at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hlip_core.data.manifest import read_manifest
    from hlip_core.eval.embedding import embed_items, manifest_items
    from hlip_core.eval.probe import checkpoint_fingerprint, evaluate_probe, fit_probe, held_out_split, manifest_labels
    from hlip_core.model import load

    ckpt = Path(args.checkpoint).resolve()
    fingerprint = checkpoint_fingerprint(ckpt)
    records = read_manifest(args.data)
    names, labels = manifest_labels(records, args.findings)
    held = held_out_split([r["study_id"] for r in records], args.held_out, args.seed)
    if held.all() or not held.any():
        raise ValueError(f"the split of {len(records)} studies left one part empty; use more studies or another --held-out")
    model = load(ckpt, device=args.device)
    items = manifest_items(args.data, "study", records)
    z = embed_items(model, items, args.batch_size, args.device, args.precision, args.max_scans, embedding="findings")
    probe = fit_probe(z[~held], labels[~held], names, C=args.C, fingerprint=fingerprint, embedding="findings")
    result = evaluate_probe(probe, z[held], labels[held], n_boot=args.bootstrap, seed=args.seed)
    probe.info.update({"held_out": result, "held_out_fraction": args.held_out, "seed": args.seed,
                       "studies": {"train": int((~held).sum()), "held_out": int(held.sum())}})
    out = Path(args.out) if args.out else ckpt.parent / f"{ckpt.name}.probe.json"
    probe.save(out)
    width = max(len(n) for n in names + ["macro AUC"])
    print(f"{'finding':<{width}}   AUC   95% CI         held-out studies (positive)")
    for name, r in result["findings"].items():
        ci = "n/a" if math.isnan(r["ci_low"]) else f"{r['ci_low']:.3f}-{r['ci_high']:.3f}"
        print(f"{name:<{width}}  {r['auc']:.3f}  {ci:<13}  {r['studies']} ({r['positive']})")
    print(f"{'macro AUC':<{width}}  {result['macro_auc']:.3f}   ({int((~held).sum())} training, {int(held.sum())} held-out studies)")
    print(f"probe written to {out}")
    print(json.dumps({"macro_auc": result["macro_auc"]}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"probe: {exc}")
