"""Embed every study of a prepared manifest with a checkpoint, into an on-disk embedding index.

    python train/embed.py --checkpoint CKPT --data prepared/ --out embeddings/

The index (embeddings.npy: float16 [n, E] L2-normalised rows; ids.json) serves text-to-study and
study-to-study search (hlip_core.eval.EmbeddingIndex) and fast prompt engineering: scoring new
prompts against stored embeddings needs only the text tower. Resumable: finished chunks are kept
in OUT/parts/ and a second run continues after them.

Search is exact by default. For archives of millions of studies (exact search is fast enough below
about 2,000,000; see benchmarks/RESULTS.md) --approximate also builds a FAISS IVF-SQ8 index
(faiss.index + faiss.json beside the embeddings), which search then uses:

    python train/embed.py --checkpoint CKPT --data prepared/ --out embeddings/ --approximate --nprobe 16
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by train/pretrain.py or hlip_core.save")
    p.add_argument("--data", required=True, help="prepared manifest, or the folder holding manifest.jsonl")
    p.add_argument("--out", required=True, help="output folder of the embedding index")
    p.add_argument("--unit", choices=("study", "scan"), default="study",
                   help="one embedding per study, or per scan as a single-scan study (default: study)")
    p.add_argument("--embedding", choices=("reports", "findings"), default="reports",
                   help="which study embedding: 'reports' = the report-search one (the model's last token, "
                        "encode_study_for_reports), 'findings' = the zero-shot one (token 0, encode_study; what "
                        "train/evaluate.py and train/probe.py use); the same for single-token models; recorded in "
                        "OUT/export.json (default: reports)")
    p.add_argument("--batch-size", type=int, default=4, help="studies per forward pass (default: 4)")
    p.add_argument("--chunk", type=int, default=256, help="studies per resumable chunk on disk (default: 256)")
    p.add_argument("--max-scans", type=int, default=None, help="embed at most this many scans of a study (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)")
    p.add_argument("--approximate", action="store_true", help="also build the approximate FAISS index (IVF-SQ8, re-scored exactly) that search then uses (default: off, exact search)")
    p.add_argument("--lists", type=int, default=None, help="inverted lists of the approximate index (default: about sqrt(studies))")
    p.add_argument("--nprobe", type=int, default=16, help="lists an approximate search reads by default (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("batch_size", "chunk", "nprobe") + (("lists",) if args.lists is not None else ()):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hlip_core.eval.embedding import embed_manifest
    from hlip_core.model import load

    model = load(args.checkpoint, device=args.device)
    ckpt = Path(args.checkpoint).resolve()
    fingerprint = f"{ckpt}:{(ckpt / 'model.safetensors').stat().st_mtime_ns}"
    index = embed_manifest(model, args.data, args.out, unit=args.unit, batch_size=args.batch_size, chunk=args.chunk,
                           device=args.device, precision=args.precision, max_scans=args.max_scans,
                           progress=not args.quiet, fingerprint=fingerprint, embedding=args.embedding)
    if args.approximate:
        index.build_ann(lists=args.lists, nprobe=args.nprobe, embedding=args.embedding)
        index.save_ann(args.out)
    approx = f", approximate index {index.ann_params}" if index.ann is not None else ""
    print(f"{len(index)} {args.unit} {args.embedding} embeddings of width {index.embeddings.shape[1]} in {Path(args.out).resolve()}{approx}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"embed: {exc}")
