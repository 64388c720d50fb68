"""The demo's training step in parts: what its patch embedding and its text tower cost.

    python benchmarks/demo_step.py [--repeats 5]

On one demo batch (32 studies x 2 scans of 32x64x64, uint8 as prepared, and 32 reports written
by the demo's generator), in this process, with every core:
- forward + backward of the patch embedding alone: the linear one (`tiny_multiscan_h2`) against
  the two-stage one of the demo's configuration (`tiny_multiscan_h2_mlpstem`);
- forward + backward of the whole image tower with each;
- the locked, sentence-pooled text tower's forward on the reports, encoding every sentence (as
  before sentences were cached) against reading them from its sentence cache (warm, as in every
  step after the first epoch).
Each figure is the median of --repeats timed calls after two warm-up calls; the ratios are
between figures of this one run (the machine may be shared: compare only within a run).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def demo_reports(count: int) -> list[str]:
    from hlip_core.demo.reports import write_report
    from hlip_core.demo.synth import Anatomy, draw_study

    anatomy = Anatomy.load()
    rng = np.random.default_rng(0)
    return [write_report(draw_study(anatomy, rng, f"s{i}"), rng) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per figure (default: 5)")
    args = parser.parse_args()

    import hlip_core
    from hlip_core.demo import DEMO_TRAINING
    from hlip_core.training.optim import lock_text_tower
    from hlip_core.training.vocab import report_vocabulary, tokenizer_from_vocabulary

    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; demo configuration {DEMO_TRAINING['config']}")
    studies = torch.randint(0, 256, (32, 2, 1, 32, 64, 64), dtype=torch.uint8)
    mask = torch.ones(32, 2, dtype=torch.bool)
    scans = studies.reshape(64, 1, 32, 64, 64)
    rows = {}
    for name in ("tiny_multiscan_h2", "tiny_multiscan_h2_mlpstem"):
        model = hlip_core.create_model(name)
        trunk = model.visual.trunk
        embed = trunk.patch_embed
        rows[name] = (
            timed(lambda: embed(scans, trunk.input_mean, trunk.input_std).sum().backward(), args.repeats),
            timed(lambda: model.encode_study(studies, mask).sum().backward(), args.repeats),
        )
    print("\n| image side, 64 scans, forward + backward | patch embedding (ms) | image tower (ms) |")
    print("|---|---|---|")
    for name, (embed_ms, tower_ms) in rows.items():
        print(f"| {name} | {embed_ms:.0f} | {tower_ms:.0f} |")
    (e0, t0), (e1, t1) = rows.values()
    print(f"# two-stage / linear: patch embedding {e1 / e0:.2f}x, image tower {t1 / t0:.2f}x")

    reports = ["This MRI study shows: " + r for r in demo_reports(200)]
    tok = tokenizer_from_vocabulary(report_vocabulary(reports, vocab_size=DEMO_TRAINING["vocab_size"]), 96)
    model = hlip_core.create_model(DEMO_TRAINING["config"], tokenizer=tok, text={"pooling": "sentence"})
    lock_text_tower(model)
    batch = model.tokenize(reports[:32])
    with torch.no_grad():
        plain = timed(lambda: model.encode_text(batch), args.repeats)
        model.text.cache_sentences()
        model.encode_text(model.tokenize(reports))  # every sentence of the corpus seen once
        cached = timed(lambda: model.encode_text(batch), args.repeats)
    print(f"\n# locked text tower, 32 reports: every sentence encoded {plain:.1f} ms, from the cache {cached:.1f} ms "
          f"({plain / cached:.1f}x; {len(model.text.sentence_cache)} distinct sentences in 200 reports)")
    tower = rows[DEMO_TRAINING["config"]][1]
    print(f"# with the demo's image tower: the text forward was {plain / (plain + tower):.0%} of (text forward + image "
          f"forward/backward) per step; now {cached / (cached + tower):.0%}")


if __name__ == "__main__":
    main()
