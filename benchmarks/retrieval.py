"""Search over a large cached index (exact and FAISS IVF-SQ8), and scoring new findings.

1. Search over N cached study embeddings of width W (default 1,000,000 x 512), clustered like real
   studies (10,000 seeded clusters), generated in deterministic chunks and written chunk by chunk to
   a float16 memory-mapped index on disk (no float32 copy of the rows is ever held). For each N:
   exact ground truth for 100 queries by streaming the chunks in float32; the library's exact search
   (float16 mmap) and, at the first N, FAISS IndexFlatIP (float32 in memory) for the choice of the
   exact path; the library's FAISS IVF-SQ8 index (trained on a seeded sample, rows added chunk by
   chunk): build time, code size, recall@1/@10 against the exact answer and latency (p50/p95 of
   single queries, a batch of 100) at several nprobe, with and without the exact re-scoring; peak
   memory (RSS) of the process before and after the build.
2. Scoring 20 new findings (40 prompts) on an already embedded study, with the text tower warm,
   for the tiny and the ViT-B (BERT-base) text towers, fp32 and bf16, next to the floor set by
   the text tower's arithmetic at this machine's matrix-multiply rate measured in the same run.

    python benchmarks/retrieval.py
    python benchmarks/retrieval.py --sizes 1000000 10000000 --skip-scoring
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


CHUNK = 262144


def chunk_rows(centers: np.ndarray, seed: int, c: int, rows: int) -> np.ndarray:
    """Rows of chunk ``c`` (float32, normalised): cluster centre + noise, the same for the same seed."""
    rng = np.random.default_rng([seed, c])
    x = centers[rng.integers(0, len(centers), rows)]
    x += 0.5 * rng.standard_normal(x.shape, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def recall(found: list[list[str]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len({int(s[1:]) for s in f[:k]} & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def latency_ms(fn, queries: np.ndarray) -> tuple[float, float]:
    """(p50, p95) in ms of single queries, after one warm-up."""
    fn(queries[:1])
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None])
        times.append(time.perf_counter() - t)
    return 1000 * float(np.percentile(times, 50)), 1000 * float(np.percentile(times, 95))


def batch_ms(fn, queries: np.ndarray) -> float:
    t = time.perf_counter()
    fn(queries)
    return 1000 * (time.perf_counter() - t)


def peak_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def search_at(n: int, width: int, queries_n: int, nprobes: list[int], folder: str, flat: bool, lists: int | None) -> EmbeddingIndex:
    """Part 1 at one size; returns the (memory-mapped) index for the text-tower line."""
    import faiss

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10_000, width), dtype=np.float32)
    queries = centers[rng.integers(0, len(centers), queries_n)] + 0.5 * rng.standard_normal((queries_n, width), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    emb = np.lib.format.open_memmap(f"{folder}/embeddings.npy", mode="w+", dtype=np.float16, shape=(n, width))
    best_s = np.full((queries_n, 10), -np.inf, dtype=np.float32)
    best_i = np.zeros((queries_n, 10), dtype=np.int64)
    t0, streamed = time.perf_counter(), 0.0
    for c, start in enumerate(range(0, n, CHUNK)):
        x = chunk_rows(centers, 1, c, min(CHUNK, n - start))
        emb[start : start + len(x)] = x
        t = time.perf_counter()
        s = np.concatenate([best_s, queries @ x.T], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(x)), (queries_n, len(x)))], axis=1)
        top = np.argsort(-s, axis=1)[:, :10]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        streamed += time.perf_counter() - t
    emb.flush()
    del emb
    print(f"\n## {n:,} x {width}: generated and written in {time.perf_counter() - t0:.0f} s; exact float32 ground truth "
          f"for {queries_n} queries streamed over the chunks in {streamed:.1f} s ({1000 * streamed / queries_n:.0f} ms per query)")
    index = EmbeddingIndex(np.load(f"{folder}/embeddings.npy", mmap_mode="r"), [f"s{i}" for i in range(n)])
    rows = []
    exact = index.search(queries, 10, approximate=False)
    rows.append(("exact, float16 mmap (library)", "-", recall([[h for h, _ in r] for r in exact], best_i, 1),
                 recall([[h for h, _ in r] for r in exact], best_i, 10),
                 latency_ms(lambda q: index.search(q, 10, approximate=False), queries[:21]),
                 batch_ms(lambda q: index.search(q, 10, approximate=False), queries), "-", f"{2 * n * width / 1e9:.1f} GB (disk, mmap)"))
    if flat:
        t = time.perf_counter()
        ip = faiss.IndexFlatIP(width)
        for start in range(0, n, CHUNK):
            ip.add(np.ascontiguousarray(index.embeddings[start : start + CHUNK], dtype=np.float32))
        built = time.perf_counter() - t
        found = lambda q: [[f"s{j}" for j in r] for r in ip.search(np.ascontiguousarray(q), 10)[1]]
        res = found(queries)
        rows.append(("exact, FAISS IndexFlatIP float32", "-", recall(res, best_i, 1), recall(res, best_i, 10),
                     latency_ms(found, queries[:21]), batch_ms(found, queries), f"{built:.0f}", f"{4 * n * width / 1e9:.1f} GB (RAM)"))
        del ip
    rss = peak_gb()
    t = time.perf_counter()
    index.build_ann(lists=lists)
    built = time.perf_counter() - t
    code_gb = index.ann.code_size * n / 1e9
    for nprobe in nprobes:
        res = index.search(queries, 10, nprobe=nprobe)
        rows.append((f"FAISS IVF-SQ8, {index.ann_params['lists']} lists, + exact re-scoring (library)", nprobe,
                     recall([[h for h, _ in r] for r in res], best_i, 1), recall([[h for h, _ in r] for r in res], best_i, 10),
                     latency_ms(lambda q: index.search(q, 10, nprobe=nprobe), queries[:51]),
                     batch_ms(lambda q: index.search(q, 10, nprobe=nprobe), queries), f"{built:.0f}", f"{code_gb:.2f} GB codes (RAM)"))
        index.ann.nprobe = nprobe
        raw = [[f"s{j}" for j in r] for r in index.ann.search(queries, 10)[1]]
        rows.append(("  same, SQ8 codes only (no re-scoring)", nprobe, recall(raw, best_i, 1), recall(raw, best_i, 10),
                     latency_ms(lambda q: index.ann.search(q, 10), queries[:51]), batch_ms(lambda q: index.ann.search(q, 10), queries), "", ""))
    print(f"| search | nprobe | recall@1 | recall@10 | p50 / p95 ms per query | ms per batch of {queries_n} | build s | memory |")
    print("|---|---|---|---|---|---|---|---|")
    for name, npb, r1, r10, (p50, p95), batch, build, mem in rows:
        print(f"| {name} | {npb} | {r1:.3f} | {r10:.3f} | {p50:.1f} / {p95:.1f} | {batch:.0f} | {build} | {mem} |")
    print(f"peak memory (RSS) of this process: {rss:.1f} GB before the FAISS build, {peak_gb():.1f} GB after")
    return index


def compare_kinds(n: int, width: int, queries_n: int) -> None:
    """How the FAISS index type was chosen: IVF-Flat, IVF-SQ8 and IVF-PQ (32 and 64 codes of 8 bits)
    on n rows held in memory, sqrt(n) lists trained on 40 rows per list: train and add time, and
    recall@10 at nprobe 16 of the codes alone and after re-scoring 256 candidates exactly."""
    import faiss

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((10_000, width), dtype=np.float32)
    x = np.concatenate([chunk_rows(centers, 1, c, min(CHUNK, n - start)) for c, start in enumerate(range(0, n, CHUNK))])
    q = centers[rng.integers(0, len(centers), queries_n)] + 0.5 * rng.standard_normal((queries_n, width), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10]
    lists = int(round(np.sqrt(n)))
    sample = x[np.sort(np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False))]
    kinds = {"IVF-Flat": lambda: faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT),
             "IVF-SQ8": lambda: faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, lists, faiss.ScalarQuantizer.QT_8bit,
                                                              faiss.METRIC_INNER_PRODUCT),
             "IVF-PQ 32x8": lambda: faiss.IndexIVFPQ(faiss.IndexFlatIP(width), width, lists, 32, 8, faiss.METRIC_INNER_PRODUCT),
             "IVF-PQ 64x8": lambda: faiss.IndexIVFPQ(faiss.IndexFlatIP(width), width, lists, 64, 8, faiss.METRIC_INNER_PRODUCT)}
    print(f"\n## choice of the FAISS index: {n:,} x {width}, {lists} lists, nprobe 16")
    print("| index | bytes / row | train s | add s | recall@10 codes only | recall@10 re-scored (256 candidates) |")
    print("|---|---|---|---|---|---|")
    for name, make in kinds.items():
        ann = make()
        t = time.perf_counter()
        ann.train(sample)
        trained = time.perf_counter() - t
        t = time.perf_counter()
        ann.add(x)
        added = time.perf_counter() - t
        ann.nprobe = 16
        found = ann.search(q, 256)[1]
        rescored = [r[r >= 0][np.argsort(-(x[r[r >= 0]] @ q[i]))] for i, r in enumerate(found)]
        raw = [[f"s{j}" for j in r[:10]] for r in found]
        print(f"| {name} | {ann.code_size} | {trained:.1f} | {added:.1f} | {recall(raw, truth, 10):.3f} | "
              f"{recall([[f's{j}' for j in r[:10]] for r in rescored], truth, 10):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[1_000_000], help="cached study embeddings; none: skip part 1 (default: %(default)s)")
    p.add_argument("--width", type=int, default=512, help="embedding width (default: %(default)s)")
    p.add_argument("--queries", type=int, default=100, help="queries (default: %(default)s)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 64], help="lists read by the approximate search (default: %(default)s)")
    p.add_argument("--lists", type=int, default=None, help="inverted lists of the FAISS index (default: the library's, about sqrt(N))")
    p.add_argument("--skip-scoring", action="store_true", help="only part 1")
    p.add_argument("--compare-kinds", type=int, default=0, metavar="N",
                   help="first compare FAISS index types on N rows in memory (how IVF-SQ8 was chosen; e.g. 100000)")
    p.add_argument("--tmp", default=None, help="folder for the on-disk index (default: the system's temporary folder)")
    args = p.parse_args()
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")

    if args.compare_kinds:
        compare_kinds(args.compare_kinds, args.width, args.queries)
    tok = hlip_core.train_wordpiece([" ".join(WORDS)] * 10, vocab_size=200, min_frequency=1)
    for j, n in enumerate(args.sizes):
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            index = search_at(n, args.width, args.queries, args.nprobe, tmp, flat=j == 0, lists=args.lists)
            if j == 0:
                tiny = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, embed_dim=args.width).eval()
                i = iter(range(10**6))
                with torch.no_grad():
                    enc_search = median_ms(lambda: index.search(tiny.encode_text([f"left frontal mass {next(i)}"]).numpy(), k=10), 21)
                print(f"tiny text tower encode + search (as the index would answer): median {enc_search:.1f} ms")
            del index
    if args.skip_scoring:
        return

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
