"""Hierarchical vs full attention: forward time, peak memory and FLOP rate of the study encoder.

Prints, for 1, 2, 4, 8 and 16 scans of the token1176 configuration (scans of 48x224x224), the
forward time (both models timed in turns in one process) and peak memory (resident memory one
forward adds above the built model and its input, in a fresh process) of the hierarchical model and of the same model with full attention,
their ratio, and the achieved FLOP rate as a fraction of this machine's fp32 matrix-multiply rate,
measured in the same run (the machine is shared: compare ratios, not absolute figures).

    python benchmarks/encoder.py                       # ViT-B, token1176, 1..16 scans
    python benchmarks/encoder.py --width 384 --heads 6 # a narrower model when ViT-B is too slow
"""
from __future__ import annotations

import argparse
import json
import os
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


def _build(config: str, width: int | None, heads: int | None):
    from hlip_core.model.clip import build_trunk
    from hlip_core.model.registry import get_config

    overrides = {"vision": {"width": width, "num_heads": heads}} if width else {}
    vision = get_config(config, **overrides)["vision"]
    return build_trunk(vision).eval(), vision


def measure_time(config: str, scans: int, width: int | None, heads: int | None, repeats: int) -> dict:
    """Hierarchical and full attention timed in turns in one process, so that a change in the
    machine's load hits both alike; the best of ``repeats`` forwards of each is kept."""
    hier, vision = _build(config, width, heads)
    full, _ = _build(config + "_fullattn", width, heads)
    x = torch.randn(1, scans, 1, *vision["img_size"])
    best = {"hier": float("inf"), "full": float("inf")}
    with torch.inference_mode():
        hier(x), full(x)  # warm-up
        for _ in range(repeats):
            for kind, trunk in (("hier", hier), ("full", full)):
                t = time.perf_counter()
                trunk(x)
                best[kind] = min(best[kind], time.perf_counter() - t)
    return {"hier": best["hier"], "full": best["full"], "rate": matmul_rate(repeats=10), "hier_flops": forward_flops(vision, scans),
            "full_flops": forward_flops(dict(vision, levels=["study"] * len(vision["levels"])), scans)}


def measure_memory(config: str, scans: int, width: int | None, heads: int | None) -> float:
    """Resident memory (MB) one forward adds above the built model and its input (fresh process)."""
    trunk, vision = _build(config, width, heads)
    x = torch.randn(1, scans, 1, *vision["img_size"])
    with torch.inference_mode():
        base = _reset_peak_rss()
        trunk(x)
    return (_status_kb("VmHWM") - base) / 1024


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: write 5 to clear_refs); returns the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def _child(args_list: list[str]) -> dict:
    # large blocks straight from mmap, so resident memory follows the live tensors, not malloc's cache
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, *args_list], check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vit_base_multiscan_h2_token1176", help="hierarchical configuration (default: %(default)s)")
    parser.add_argument("--scans", default="1,2,4,8,16", help="numbers of scans per study (default: %(default)s)")
    parser.add_argument("--width", type=int, default=None, help="override the width (default: the configuration's)")
    parser.add_argument("--heads", type=int, default=None, help="heads when --width is given")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model and point, in turns; the best is kept (default: %(default)s)")
    parser.add_argument("--_time", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._time:
        print(json.dumps(measure_time(args._time[0], int(args._time[1]), args.width, args.heads, args.repeats)))
        return
    if args._memory:
        print(json.dumps({"mb": measure_memory(args._memory[0], int(args._memory[1]), args.width, args.heads)}))
        return

    extra = ["--width", str(args.width), "--heads", str(args.heads)] if args.width else []
    print(f"# python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    rate = matmul_rate()
    print(f"# fp32 matmul rate measured now: {rate:.0f} GFLOP/s")
    header = (f"{'scans':>5} | {'hier s':>7} {'full s':>7} {'time ratio':>10} {'FLOP ratio':>10} | "
              f"{'hier MB':>8} {'full MB':>8} | {'hier %mm':>8} {'full %mm':>8}")
    print(header)
    print("-" * len(header))
    for scans in (int(s) for s in args.scans.split(",")):
        t = _child(["--_time", args.config, str(scans), "--repeats", str(args.repeats), *extra])
        mem_h = _child(["--_memory", args.config, str(scans), *extra])["mb"]
        mem_f = _child(["--_memory", args.config + "_fullattn", str(scans), *extra])["mb"]
        print(
            f"{scans:>5} | {t['hier']:7.2f} {t['full']:7.2f} {t['full'] / t['hier']:9.2f}x {t['full_flops'] / t['hier_flops']:9.2f}x | "
            f"{mem_h:8.0f} {mem_f:8.0f} | "
            f"{100 * t['hier_flops'] / t['hier'] / 1e9 / t['rate']:7.0f}% {100 * t['full_flops'] / t['full'] / 1e9 / t['rate']:7.0f}%",
            flush=True,
        )
    print(f"# fp32 matmul rate at the end: {matmul_rate():.0f} GFLOP/s")


if __name__ == "__main__":
    main()
