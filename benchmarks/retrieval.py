"""Latency of text-to-study search over a large cached index, and of scoring new findings.

1. Text query over N cached study embeddings (default 1,000,000 of width 512, float16 on disk,
   memory-mapped): median latency of the search alone and of text encoding + search.
2. Scoring 20 new findings (40 prompts) on an already embedded study, with the text tower warm,
   for the tiny and the ViT-B (BERT-base) text towers, fp32 and bf16.

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
        emb = rng.standard_normal((args.studies, args.width), dtype=np.float32)
        EmbeddingIndex.build(emb, [f"s{i}" for i in range(args.studies)]).save(tmp)
        del emb
        index = EmbeddingIndex.load(tmp)
        q = rng.standard_normal((1, args.width)).astype(np.float32)
        search = median_ms(lambda: index.search(q, k=10), args.repeats)
        print(f"search over {args.studies:,} x {args.width} (float16, mmap): median {search:.1f} ms per text query (bar: < 100 ms)")

        tok = hlip_core.train_wordpiece([" ".join(WORDS)] * 10, vocab_size=200, min_frequency=1)
        tiny = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok, embed_dim=args.width).eval()
        i = iter(range(10**6))
        with torch.no_grad():
            enc_search = median_ms(lambda: index.search(tiny.encode_text([f"left frontal mass {next(i)}"]).numpy(), k=10), args.repeats)
        print(f"tiny text tower encode + search: median {enc_search:.1f} ms")

    print("scoring 20 new findings (40 prompts) on one embedded study, text tower warm:")
    for name in ("tiny_multiscan_h2", "vit_base_multiscan_h2_token1176"):
        model = hlip_core.create_model(name, tokenizer=tok).eval()
        study = torch.nn.functional.normalize(torch.randn(1, model.config["embed_dim"]), dim=-1)
        for precision in ("fp32", "bf16"):
            clf = ZeroShotClassifier(model)
            counter = iter(range(10**6))

            def run():
                with autocast("cpu", precision):
                    clf.scores(study, findings_from_text(new_findings(next(counter))))

            print(f"  {name:<36} {precision}: median {median_ms(run, 9):6.1f} ms (bar: < 50 ms)")


if __name__ == "__main__":
    main()
