"""Latency of text-to-study search over a large cached index, and of scoring new findings.

1. Text query over N cached study embeddings (default 1,000,000 of width 512, float16 on disk,
   memory-mapped, clustered like real studies): median latency of the exact search, of text
   encoding + search, and of the approximate inverted-list search (build time, latency, recall@10
   against the exact answer).
2. Scoring 20 new findings (40 prompts) on an already embedded study, with the text tower warm,
   for the tiny and the ViT-B (BERT-base) text towers, fp32 and bf16, next to the floor set by
   the text tower's arithmetic at this machine's matrix-multiply rate measured in the same run.

    python benchmarks/retrieval.py
    python benchmarks/retrieval.py --studies 100000 --width 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import hlip_core
from hlip_core.eval import EmbeddingIndex, ZeroShotClassifier, findings_from_text
from hlip_core.model import autocast

WORDS = ["haemorrhage", "mass", "oedema", "infarct", "atrophy", "shift", "lesion", "enhancing", "frontal", "parietal",
         "ventricles", "hydrocephalus", "subdural", "chronic", "acute", "small", "large", "left", "right", "midline"]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def matmul_rate(precision: str, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n matrix product in fp32 or bf16 on this machine, now."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def text_flops(model, tokens: int) -> float:
    """Multiply-adds x 2 of the text tower's linear layers for ``tokens`` tokens (attention over a
    few tokens is negligible next to them)."""
    linear = sum(m.weight.numel() for m in model.text.transformer.modules() if isinstance(m, torch.nn.Linear))
    return 2.0 * tokens * linear


def new_findings(i: int) -> list[str]:
    rng = np.random.default_rng(i)
    return [" ".join(rng.choice(WORDS, 3)) + f" {i}-{j}" for j in range(20)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=1_000_000, help="cached study embeddings (default: %(default)s)")
    p.add_argument("--width", type=int, default=512, help="embedding width (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=21, help="timed queries (default: %(default)s)")
    args = p.parse_args()
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        centers = rng.standard_normal((1000, args.width), dtype=np.float32)
        emb = centers[rng.integers(0, len(centers), args.studies)]
        emb += 0.5 * rng.standard_normal(emb.shape, dtype=np.float32)
        queries = emb[rng.integers(0, args.studies, args.repeats)] + 0.2 * rng.standard_normal((args.repeats, args.width), dtype=np.float32)
        index = EmbeddingIndex.build(emb, [f"s{i}" for i in range(args.studies)])
        del emb
        t = time.perf_counter()
        index.build_ivf()
        build = time.perf_counter() - t
        index.save(tmp)
        index = EmbeddingIndex.load(tmp)
        q = iter(queries.tolist() * 2)
        search = median_ms(lambda: index.search([next(q)], k=10), args.repeats - 1)
        print(f"exact search over {args.studies:,} x {args.width} (float16, mmap): median {search:.1f} ms per text query (bar: < 100 ms)")
        lists = len(index.ivf["centroids"])
        for nprobe in (8, 32):
            q = iter(queries.tolist() * 2)
            approx = median_ms(lambda: index.search([next(q)], k=10, nprobe=nprobe), args.repeats - 1)
            recall = np.mean([len({a for a, _ in x} & {e for e, _ in y}) / 10 for x, y in
                              zip(index.search(queries, k=10, nprobe=nprobe), index.search(queries, k=10))])
            print(f"approximate search, {nprobe} of {lists} lists (built in {build:.0f} s): median {approx:.1f} ms, "
                  f"recall@10 vs exact {recall:.2f}, {search / approx:.1f}x faster")

        tok = hlip_core.train_wordpiece([" ".join(WORDS)] * 10, vocab_size=200, min_frequency=1)
        tiny = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, embed_dim=args.width).eval()
        i = iter(range(10**6))
        with torch.no_grad():
            enc_search = median_ms(lambda: index.search(tiny.encode_text([f"left frontal mass {next(i)}"]).numpy(), k=10), args.repeats)
        print(f"tiny text tower encode + search: median {enc_search:.1f} ms")

    print("scoring 20 new findings (40 prompts) on one embedded study, text tower warm:")
    rates = {p: matmul_rate(p) for p in ("fp32", "bf16")}
    print(f"  matrix-multiply rate now: fp32 {rates['fp32']:.0f}, bf16 {rates['bf16']:.0f} GFLOP/s")
    for name in ("tiny_multiscan_h2", "vit_base_multiscan_h2_token1176"):
        model = hlip_core.create_model(name, tokenizer=tok).eval()
        study = torch.nn.functional.normalize(torch.randn(1, model.config["embed_dim"]), dim=-1)
        ids, _ = model.tokenize([p for f in findings_from_text(new_findings(0)) for p in (f.positive, f.negative)])
        flops = text_flops(model, ids.numel())
        for precision in ("fp32", "bf16"):
            clf = ZeroShotClassifier(model)
            counter = iter(range(10**6))

            def run():
                with autocast("cpu", precision):
                    clf.scores(study, findings_from_text(new_findings(next(counter))))

            ms = median_ms(run, 9)
            floor = 1000 * flops / rates[precision] / 1e9
            print(f"  {name:<36} {precision}: median {ms:6.1f} ms (bar: < 50 ms); arithmetic floor at this rate "
                  f"{floor:6.1f} ms ({flops / 1e9:.1f} GFLOP for {ids.numel()} tokens), {100 * floor / ms:3.0f}% of it reached")


if __name__ == "__main__":
    main()
