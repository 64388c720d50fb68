"""Forward time and peak memory of the released HLIP image towers (random weights, built from the registry).

For each configuration, precision (fp32, bf16 autocast) and number of scans (of the configuration's
grid, 48x224x224 for the released models), a fresh process builds the visual tower (trunk + dino.txt
head), runs one warm-up forward of a one-scan study under ``torch.no_grad`` (so the warm-up costs little
next to the large points), then one timed forward of one study of that many scans.
Peak memory is the process's peak resident memory (VmHWM, Linux) during the timed forward above the
resident memory just before it (built model, input and what the warm-up left cached); the text tower
is not built. The machine is shared: figures are one run each, compare within a run.

    python benchmarks/released_forward.py
    python benchmarks/released_forward.py --configs ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568 --scans 1,4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from encoder import _reset_peak_rss, _status_kb  # benchmarks/encoder.py: the same peak-RSS method

CONFIGS = ("ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568", "ablate_seqposemb_vit_large_multiscan_h2_dualdinotxt1568")


def measure(config: str, scans: int, precision: str) -> dict:
    """One warm-up (one scan) then one timed forward of one study; returns seconds, peak MB above the start, output shape."""
    from hlip_core.model.clip import autocast, build_trunk
    from hlip_core.model.encoder import VisualTower
    from hlip_core.model.registry import get_config

    cfg = get_config(config)
    tower = VisualTower(build_trunk(cfg["vision"]), int(cfg["embed_dim"])).eval()
    x = torch.rand(1, scans, 1, *cfg["vision"]["img_size"])
    with torch.no_grad(), autocast("cpu", precision):
        tower(x[:, :1])  # warm-up
        base = _reset_peak_rss()
        t = time.perf_counter()
        out = tower(x)
        seconds = time.perf_counter() - t
    return {"s": seconds, "mb": (_status_kb("VmHWM") - base) / 1024, "model_mb": base / 1024, "shape": list(out.shape),
            "params": sum(p.numel() for p in tower.parameters())}


def _child(config: str, scans: int, precision: str) -> dict:
    # large blocks straight from mmap, so resident memory follows the live tensors, not malloc's cache
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--_one", config, str(scans), precision], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    from hlip_core.model.clip import cpu_has_native_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configurations (default: %(default)s)")
    parser.add_argument("--scans", default="1,4,8", help="numbers of scans per study (default: %(default)s)")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast) (default: %(default)s)")
    parser.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._one:
        print(json.dumps(measure(args._one[0], int(args._one[1]), args._one[2])))
        return
    print(f"# python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 (AMX/avx512_bf16): "
          f"{'yes' if cpu_has_native_bf16() else 'no'}")
    print("| configuration | params (M) | scans | precision | forward s | peak MB above start | output |")
    print("|---|---|---|---|---|---|---|")
    for scans in (int(s) for s in args.scans.split(",")):  # the cheap points first
        for config in args.configs.split(","):
            for precision in args.precisions.split(","):
                r = _child(config, scans, precision)
                print(f"| {config} | {r['params'] / 1e6:.1f} | {scans} | {precision} | {r['s']:.2f} | {r['mb']:.0f} | "
                      f"{tuple(r['shape'])} |", flush=True)


if __name__ == "__main__":
    main()
