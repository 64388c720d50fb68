"""How detectable each demo finding is at the model grid: a supervised model per study.

Trains, with the labels (multi-label, binary cross-entropy), either a small 3D CNN (``--model cnn``:
4 conv blocks, the 4 contrasts as channels, zeros for a missing one) or the demo's own image encoder
(``--model vit``: the tiny_multiscan_h2 hierarchical ViT, each scan a scan as HLIP sees it, a linear
head on the study feature) on the demo's prepared training arrays, and prints the held-out AUC per
finding after each epoch. It is a reference for the demo, not part of HLIP: what a supervised model
finds with labels and the language-image model does not find zero-shot is lost on the language side,
not in the data or the encoder (the CNN, which pools its features globally, misses the midline
shift; the ViT, which has position embeddings, finds it).

    make demo                                       # any demo run builds demo_output/
    python benchmarks/demo_upper_bound.py --demo-folder demo_output --epochs 8
    python benchmarks/demo_upper_bound.py --demo-folder demo_output --model vit --lr 3e-4 --epochs 17
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


def _split(folder: Path, split: str) -> tuple[Path, dict[str, dict]]:
    """The prepared folder of a demo split and its label rows by study id."""
    root = folder / split / "prepared"
    if not (root / "manifest.jsonl").is_file():
        raise SystemExit(f"no prepared demo split in {root}: run the demo first (python train/pretrain.py --demo-folder {folder})")
    return root, {r["study_id"]: r for r in csv.DictReader(open(folder / split / "reports.csv", encoding="utf-8"))}


def _labels(rows: dict[str, dict], ids: list[str]) -> torch.Tensor:
    return torch.tensor([[int(rows[i][f]) for f in FINDINGS] for i in ids], dtype=torch.float32)


def load_studies(folder: Path, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each study as its scans [N, 1, D, H, W] (the model's input), with the labels [S, 5]."""
    from hlip_core.eval.embedding import item_tensor, manifest_items

    root, rows = _split(folder, split)
    items = manifest_items(root)
    return [item_tensor(i) for i in items], _labels(rows, [i.item_id for i in items])


class ViTClassifier(nn.Module):
    """The demo's image encoder (untrained) with a linear head on its study feature."""

    def __init__(self) -> None:
        super().__init__()
        from hlip_core.demo import DEMO_TRAINING
        from hlip_core.model.clip import build_trunk
        from hlip_core.model.registry import get_config

        vision = get_config(DEMO_TRAINING["config"])["vision"]
        self.trunk = build_trunk(vision)
        self.head = nn.Linear(int(vision["width"]), len(FINDINGS))

    def forward(self, studies: list[torch.Tensor]) -> torch.Tensor:
        from hlip_core.eval.embedding import collate

        return self.head(self.trunk(*collate(studies)))


def load(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each study as the 4 contrasts stacked as channels [S, 4, D, H, W] (zeros for a missing one), with the labels."""
    root, rows = _split(folder, split)
    xs, ids = [], []
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
        ids.append(record["study_id"])
    return torch.from_numpy(np.stack(xs)), _labels(rows, ids)


def block(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.BatchNorm3d(o), nn.ReLU(), nn.MaxPool3d(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-folder", default="demo_output", help="a built demo (default: %(default)s)")
    parser.add_argument("--model", choices=("cnn", "vit"), default="cnn",
                        help="a small 3D CNN, or the demo's hierarchical ViT image encoder (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    folder = Path(args.demo_folder)
    if args.model == "cnn":
        x_train, y_train = load(folder, "train")
        x_test, y_test = load(folder, "test")
        print(f"# {len(x_train)} training and {len(x_test)} held-out demo studies, arrays {tuple(x_train.shape[1:])}")
        model = nn.Sequential(block(len(CONTRASTS), 16), block(16, 32), block(32, 64), block(64, 64),
                              nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(64, len(FINDINGS)))
        batch = lambda x, index: x[index]  # noqa: E731
    else:
        x_train, y_train = load_studies(folder, "train")
        x_test, y_test = load_studies(folder, "test")
        print(f"# {len(x_train)} training and {len(x_test)} held-out demo studies, scans {tuple(x_train[0].shape[1:])}")
        model = ViTClassifier()
        batch = lambda x, index: [x[int(i)] for i in index]  # noqa: E731
    # the CNN as it was first measured; the ViT with the demo's recipe (weight decay, 50 warm-up steps, clipping)
    # at --lr (constant after the warm-up)
    vit = args.model == "vit"
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=0.05 if vit else 0.01)
    step = 0
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 32):
            b = order[i : i + 32]
            step += 1
            if vit:
                for group in opt.param_groups:
                    group["lr"] = args.lr * min(1.0, step / 50)
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch(x_train, b)), y_train[b])
            opt.zero_grad()
            loss.backward()
            if vit:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        model.eval()
        with torch.no_grad():
            scores = torch.cat([model(batch(x_test, torch.arange(i, min(i + 32, len(x_test)))))
                                for i in range(0, len(x_test), 32)]).numpy()
        aucs = [roc_auc_score(y_test[:, j].numpy(), scores[:, j]) for j in range(len(FINDINGS))]
        print(f"epoch {epoch + 1} ({time.perf_counter() - start:.0f} s): "
              + " ".join(f"{f} {a:.3f}" for f, a in zip(FINDINGS, aucs)) + f"  macro {np.mean(aucs):.3f}", flush=True)


if __name__ == "__main__":
    main()
