"""How detectable each demo finding is at the model grid: a supervised 3D CNN per study.

Trains a small 3D CNN (4 conv blocks, the 4 contrasts as channels, zeros for a missing one) on the
demo's prepared training arrays with the labels (multi-label, binary cross-entropy) and prints the
held-out AUC per finding after each epoch. It is a reference for the demo, not part of HLIP: a
finding this supervised model cannot find at the 32x64x64 grid cannot be found zero-shot either.

    make demo                                       # any demo run builds demo_output/
    python benchmarks/demo_upper_bound.py --demo-folder demo_output --epochs 8
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from hlip_core.demo import FINDINGS

CONTRASTS = ("t1", "t2_tse", "flair", "diff")  # series-name fragments of the demo's 4 contrasts


def load(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    root = folder / split / "prepared"
    if not (root / "manifest.jsonl").is_file():
        raise SystemExit(f"no prepared demo split in {root}: run the demo first (python train/pretrain.py --demo-folder {folder})")
    labels = {r["study_id"]: r for r in csv.DictReader(open(folder / split / "reports.csv", encoding="utf-8"))}
    xs, ys = [], []
    for line in (root / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        x = None
        for scan in record["scans"]:
            array = np.load(root / scan["path"])
            if x is None:
                x = np.zeros((len(CONTRASTS), *array.shape), np.float32)
            hits = [i for i, c in enumerate(CONTRASTS) if c in scan["scan_id"]]
            if hits:
                x[hits[0]] = array / 255.0
        xs.append(x)
        ys.append([int(labels[record["study_id"]][f]) for f in FINDINGS])
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.float32)


def block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d(o), nn.ReLU(), nn.MaxPool3d(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-folder", default="demo_output", help="a built demo (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    folder = Path(args.demo_folder)
    x_train, y_train = load(folder, "train")
    x_test, y_test = load(folder, "test")
    print(f"# {len(x_train)} training and {len(x_test)} held-out demo studies, arrays {tuple(x_train.shape[1:])}")
    model = nn.Sequential(block(len(CONTRASTS), 16), block(16, 32), block(32, 64), block(64, 64),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, len(FINDINGS)))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 32):
            b = order[i : i + 32]
            loss = nn.functional.binary_cross_entropy_with_logits(model(x_train[b]), y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(x_test[i : i + 32]) for i in range(0, len(x_test), 32)]).numpy()
        aucs = [roc_auc_score(y_test[:, j].numpy(), scores[:, j]) for j in range(len(FINDINGS))]
        print(f"epoch {epoch + 1} ({time.perf_counter() - start:.0f} s): "
              + " ".join(f"{f} {a:.3f}" for f, a in zip(FINDINGS, aucs)) + f"  macro {np.mean(aucs):.3f}", flush=True)


if __name__ == "__main__":
    main()
