"""Hierarchical vs full attention: forward time, peak memory and FLOP rate of the study encoder.

Prints, for 1, 2, 4, 8 and 16 scans of the token1176 configuration (scans of 48x224x224), the
forward time and peak memory (resident memory the forward adds above the built model and its
input, measured in a fresh process per point) of the hierarchical model and of the same model with full attention,
their ratio, and the achieved FLOP rate as a fraction of this machine's fp32 matrix-multiply rate,
measured in the same run (the machine is shared: compare ratios, not absolute figures).

    python benchmarks/encoder.py                       # ViT-B, token1176, 1..16 scans
    python benchmarks/encoder.py --width 384 --heads 6 # a narrower model when ViT-B is too slow
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of an n x n matrix product on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def forward_flops(vision: dict, scans: int) -> float:
    """Multiply-adds x 2 of one forward pass (linear layers, attention, patch embedding)."""
    d, h, w = (s // p for s, p in zip(vision["img_size"], vision["patch_size"]))
    C, tokens = vision["width"], d * h * w
    hidden = int(C * vision.get("mlp_ratio", 4.0))
    total = 2 * scans * tokens * C * (vision["patch_size"][0] * vision["patch_size"][1] * vision["patch_size"][2])
    for level in vision["levels"]:
        if level == "slice":
            parts, length = scans * d, h * w + 1
        elif level == "scan":
            parts, length = scans, tokens + 1
        else:
            parts, length = 1, scans * tokens + 1
        seq = parts * length
        total += 2 * seq * (4 * C * C + 2 * C * hidden)  # qkv + proj + mlp
        total += 2 * 2 * parts * length * length * C  # q k^T and attn v
    return float(total)


def measure(config: str, scans: int, width: int | None, heads: int | None, repeats: int) -> dict:
    """Run in a fresh process so that its peak resident memory belongs to this measurement alone."""
    from hlip_core.model.clip import build_trunk
    from hlip_core.model.registry import get_config

    overrides = {}
    if width:
        overrides["vision"] = {"width": width, "num_heads": heads}
    vision = get_config(config, **overrides)["vision"]
    trunk = build_trunk(vision).eval()
    x = torch.randn(1, scans, 1, *vision["img_size"])
    with torch.inference_mode():
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # model and input, before any forward
        trunk(x)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            trunk(x)
            times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": min(times), "peak_mb": (peak - base) / 1024, "flops": forward_flops(vision, scans)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vit_base_multiscan_h2_token1176", help="hierarchical configuration (default: %(default)s)")
    parser.add_argument("--scans", default="1,2,4,8,16", help="numbers of scans per study (default: %(default)s)")
    parser.add_argument("--width", type=int, default=None, help="override the width (default: the configuration's)")
    parser.add_argument("--heads", type=int, default=None, help="heads when --width is given")
    parser.add_argument("--repeats", type=int, default=2, help="timed forwards per point; the best is kept (default: %(default)s)")
    parser.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        config, scans, _ = args._child
        print(json.dumps(measure(config, int(scans), args.width, args.heads, args.repeats)))
        return

    torch.set_num_threads(torch.get_num_threads())
    print(f"# {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate = matmul_rate()
    print(f"# fp32 matmul rate measured now: {rate:.0f} GFLOP/s")
    header = f"{'scans':>5} | {'hier s':>7} {'full s':>7} {'time ratio':>10} | {'hier MB':>8} {'full MB':>8} | {'hier %mm':>8} {'full %mm':>8}"
    print(header)
    print("-" * len(header))
    for scans in (int(s) for s in args.scans.split(",")):
        row = {}
        for kind, name in (("hier", args.config), ("full", args.config + "_fullattn")):
            cmd = [sys.executable, __file__, "--_child", name, str(scans), "x", "--repeats", str(args.repeats)]
            if args.width:
                cmd += ["--width", str(args.width), "--heads", str(args.heads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[kind] = json.loads(out.strip().splitlines()[-1])
        h, f = row["hier"], row["full"]
        print(
            f"{scans:>5} | {h['seconds']:7.2f} {f['seconds']:7.2f} {f['seconds'] / h['seconds']:9.2f}x | "
            f"{h['peak_mb']:8.0f} {f['peak_mb']:8.0f} | "
            f"{100 * h['flops'] / h['seconds'] / 1e9 / rate:7.0f}% {100 * f['flops'] / f['seconds'] / 1e9 / rate:7.0f}%",
            flush=True,
        )
    print(f"# fp32 matmul rate at the end: {matmul_rate():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
