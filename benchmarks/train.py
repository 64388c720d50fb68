"""Training throughput: studies/s and peak memory per step, with 1 and 2 DDP processes, and the demo.

    python benchmarks/train.py                 # tiny and ViT-B configurations, 1 and 2 processes
    python benchmarks/train.py --demo          # the full default demo: wall time and held-out AUC
    python benchmarks/train.py --demo --seeds 3  # the same with seeds 0, 1, 2: mean and range of the AUC

Each run is train/pretrain.py itself (one process, or torchrun with 2 processes) on a small prepared
archive of random studies written here; the figures come from the run's summary.json: median step
time after warm-up, studies/s, and each process's peak memory over its training steps (resident
memory on the CPU, allocated memory on a GPU). Scaling efficiency = studies/s with 2 processes /
(2 x studies/s with 1). One process gets every core (OMP threads = cores); each of 2 processes gets
half. Model FLOP utilisation (MFU) = FLOPs of one training step (counted by torch's FLOP counter)
x steps/s / this machine's matrix-multiply rate measured in the same run and precision; on a GPU
that rate is the bf16 one. The machine may be shared with other work: compare figures of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "train" / "pretrain.py"

CASES = {
    # name: configuration, scan grid, studies per process and micro-batch, scans per study, steps
    "tiny": ("tiny_multiscan_h2", (32, 64, 64), 4, 2, 12),
    "vit-b": ("vit_base_multiscan_h2_token1176", (48, 224, 224), 1, 2, 4),
}


def write_archive(folder: Path, shape, studies: int, scans: int, seed: int = 0) -> Path:
    """A prepared folder of random studies (the contract of hlip_core.data.manifest)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(studies):
        records = []
        for k in range(scans):
            rel = f"arrays/s{i}/scan{k}.npy"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / rel, rng.integers(0, 256, size=shape, dtype=np.uint8))
            records.append({"scan_id": f"scan{k}", "path": rel, "shape": list(shape), "dtype": "uint8", "modality": "MR"})
        sentences = [f"finding {i % 7} is seen.", f"no finding {i % 5}."]
        lines.append(json.dumps({"study_id": f"s{i}", "scans": records, "report": " ".join(sentences), "sentences": sentences}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "preprocess.json").write_text(json.dumps({"target_shape": list(shape)}))
    return folder


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n matrix product on this machine, now."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(config: str, shape, batch: int, scans: int, device: torch.device) -> float:
    """FLOPs of one training step (forward and backward, CLIP loss) of ``batch`` studies."""
    from torch.utils.flop_counter import FlopCounterMode

    import hlip_core
    from hlip_core.loss import ClipLoss

    tok = hlip_core.train_wordpiece(["finding one is seen", "no finding two"] * 4, vocab_size=60, min_frequency=1)
    model = hlip_core.create_model(config, tokenizer=tok, vision={"img_size": list(shape)}).to(device).train()
    x = torch.rand(batch, scans, 1, *shape, device=device)
    tokens = model.tokenize(["finding one is seen. no finding two."] * batch)
    counter = FlopCounterMode(display=False)
    with counter:
        study, text, scale, bias = model(x, tokens)
        ClipLoss()(study, text, scale, bias).backward()
    return float(counter.get_total_flops())


def run(nproc: int, args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [sys.executable, str(PRETRAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(PRETRAIN), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(cmd[:6])} ...):\n{done.stderr[-3000:]}")
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


def bench_scaling(device: str, precision: str, cases: list[str], steps_scale: float) -> None:
    dev = torch.device("cuda" if device == "cuda" else "cpu")
    cores = os.cpu_count() or 1
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    rate = matmul_rate(dev, dtype)
    print(f"# device {dev}, precision {precision}, {cores} CPU cores; {dtype} matmul rate measured now: {rate:.0f} GFLOP/s")
    print(f"{'config':<7} {'procs':>5} {'batch':>5} {'scans':>5} | {'s/step':>7} {'studies/s':>9} {'peak MB/proc':>12} | "
          f"{'GFLOP/step':>10} {'MFU':>6} | scaling")
    with tempfile.TemporaryDirectory(prefix="hlip-bench-") as tmp:
        for name in cases:
            config, shape, batch, scans, steps = CASES[name]
            steps = max(3, int(round(steps * steps_scale)))
            data = write_archive(Path(tmp) / name, shape, studies=4 * batch, scans=scans)
            flops = step_flops(config, shape, batch, scans, dev)
            one = None
            for nproc in (1, 2):
                out = Path(tmp) / f"{name}-{nproc}"
                args = ["--data", str(data), "--out", str(out), "--config", config, "--steps", str(steps), "--batch-size", str(batch),
                        "--max-scans", str(scans), "--warmup-steps", "1", "--workers", "1", "--checkpoint-every", "100000",
                        "--no-progress", "--no-tensorboard", "--device", device, "--precision", precision, "--vocab-size", "100"]
                threads = max(1, cores // nproc) if dev.type == "cpu" else 1
                summary = run(nproc, args, threads)["throughput"]
                sps = summary["studies_per_second"]
                capacity = rate * (nproc if dev.type == "cuda" else 1)  # one GPU each; CPU processes share the cores
                mfu = flops * nproc / summary["step_seconds"] / 1e9 / capacity
                scaling = "" if one is None else f"{sps / (2 * one):.0%} of 2 x 1-process"
                one = sps if one is None else one
                peaks = "/".join(f"{p:.0f}" for p in summary["peak_memory_mb_per_process"])
                print(f"{name:<7} {nproc:>5} {batch * nproc:>5} {scans:>5} | {summary['step_seconds']:7.3f} {sps:9.2f} {peaks:>12} | "
                      f"{flops * nproc / 1e9:10.1f} {mfu:6.1%} | {scaling}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(f"# {dtype} matmul rate at the end: {matmul_rate(dev, dtype):.0f} GFLOP/s (MFU uses the rate at the start)")


def cpu_times() -> list[int] | None:
    """The machine's aggregate CPU time counters (Linux /proc/stat: user nice system idle iowait irq
    softirq steal ...), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> str:
    """The share of CPU time the hypervisor gave to other machines between two readings: on a shared
    virtual machine it is time this benchmark did not get."""
    if not before or not after or len(before) < 8 or len(after) < 8:
        return "not measured"
    delta = [b - a for a, b in zip(before, after)]
    total = sum(delta[:8])
    return f"{delta[7] / total:.0%}" if total > 0 else "not measured"


def meets_bar(macro_auc: float, seconds: float) -> bool:
    """Issue 4's learning bar: held-out macro AUC >= 0.90 after a CPU training run of at most 10 minutes."""
    return macro_auc >= 0.9 and seconds <= 600


def bench_demo(seeds: int = 1) -> None:
    """The default demo, trained with seeds 0 .. seeds-1 on the same demo studies (built once):
    each run's time and held-out macro AUC, then their mean and range."""
    folder = Path(tempfile.mkdtemp(prefix="hlip-demo-bench-"))
    print(f"# command: python benchmarks/train.py --demo --seeds {seeds}", flush=True)
    try:
        results = []
        for seed in range(seeds):
            counters = cpu_times()
            start = time.perf_counter()
            out = folder / f"run-seed{seed}"
            done = subprocess.run([sys.executable, str(PRETRAIN), "--demo", "--demo-folder", str(folder), "--no-progress",
                                   "--seed", str(seed), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - start
            steal = steal_share(counters, cpu_times())
            if done.returncode != 0:
                raise SystemExit(f"the demo with seed {seed} failed:\n{done.stderr[-3000:]}")
            summary = json.loads((out / "summary.json").read_text())
            print(f"## seed {seed}\n{done.stdout.strip()}")
            run = summary["seconds"]  # the training run: text pre-training, CLIP steps, evaluations, checkpoints
            text = summary.get("text_pretraining") or {}
            auc = summary["evaluation"]["macro_auc"]
            results.append((auc, run, summary["evaluation"]["auc"]))
            what = "building the studies and preparing them, then the training run" if seed == 0 else "the training run"
            print(f"\n# seed {seed}: training run (text pre-training {text.get('seconds', 0.0):.0f} s, {summary['steps']} CLIP steps, "
                  f"evaluations, checkpoints): {run / 60:.1f} min on {os.cpu_count()} cores")
            print(f"# seed {seed}: wall time ({what}): {wall / 60:.1f} min; CPU time stolen by other virtual machines meanwhile: {steal}")
            print(f"# seed {seed}: held-out zero-shot macro AUC {auc:.4f}\n", flush=True)
        aucs = np.array([a for a, _, _ in results])
        longest = max(r for _, r, _ in results)
        met = sum(meets_bar(a, r) for a, r, _ in results)
        findings = results[0][2]
        print("# mean AUC per finding over the seeds: " + ", ".join(
            f"{name} {np.mean([per[name] for _, _, per in results]):.3f}" for name in findings))
        print(f"# held-out zero-shot macro AUC over {seeds} seed(s): mean {aucs.mean():.4f}, min {aucs.min():.4f}, "
              f"max {aucs.max():.4f}; longest training run {longest / 60:.1f} min")
        print(f"# bar (macro AUC >= 0.90 after a CPU training run of at most 10 minutes): met by {met} of {seeds} run(s); "
              f"by the mean over the seeds: {'met' if meets_bar(aucs.mean(), longest) else 'NOT met'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="time the full default demo instead (default: off)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="--demo: train with seeds 0 .. N-1 on the same studies and report the mean (default: %(default)s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training precision (default: %(default)s)")
    parser.add_argument("--cases", default="tiny,vit-b", help=f"comma-separated, of {', '.join(CASES)} (default: %(default)s)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every case's step count (default: %(default)s)")
    args = parser.parse_args()
    if args.demo:
        if args.seeds < 1:
            parser.error(f"--seeds must be at least 1, got {args.seeds}")
        bench_demo(args.seeds)
    else:
        bench_scaling(args.device, args.precision, args.cases.split(","), args.steps_scale)


if __name__ == "__main__":
    main()
