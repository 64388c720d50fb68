"""A tiny model trained, in seconds, to find a bright planted lesion: for zero-shot and heat-map tests.

Studies hold 2 scans of smooth random texture on the model grid; "lesion" studies carry a bright
box in one of them, at a random place. Reports say so in varied words. The model learns from
(study, report) pairs with the CLIP loss only; held-out studies are generated with another seed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import hlip_core
from hlip_core.loss import ClipLoss

GRID = (16, 64, 64)
LESION = (4, 16, 16)
POSITIVE = ["bright lesion present.", "there is a bright lesion.", "a bright focal lesion is seen."]
NEGATIVE = ["no lesion.", "no bright lesion is seen.", "the study is normal."]


def smooth_noise(rng: np.random.Generator, shape=GRID) -> np.ndarray:
    coarse = torch.from_numpy(rng.random((1, 1, 2, 8, 8), dtype=np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy() * 0.6 + 0.1


def make_studies(n: int, seed: int):
    """-> x [n, 2, 1, D, H, W], labels [n], lesion boxes [(scan, z, y, x)] (or None)."""
    rng = np.random.default_rng(seed)
    x = np.stack([[smooth_noise(rng) for _ in range(2)] for _ in range(n)])
    labels = rng.random(n) < 0.5
    boxes = []
    for i in range(n):
        if not labels[i]:
            boxes.append(None)
            continue
        s = int(rng.integers(0, 2))
        z, y, w = (int(rng.integers(0, g - l + 1)) for g, l in zip(GRID, LESION))
        x[i, s, z : z + LESION[0], y : y + LESION[1], w : w + LESION[2]] = 1.0
        boxes.append((s, z, y, w))
    return torch.from_numpy(x[:, :, None]).float(), labels.astype(int), boxes


def train_lesion_model(steps: int = 150, seed: int = 0, config: str = "tiny_multiscan_h2", batch: int = 16, lr: float = 1e-3, **overrides):
    """A tiny CLIP model that has learnt 'bright lesion' from reports. Returns the model in eval mode."""
    torch.manual_seed(seed)
    tok = hlip_core.train_wordpiece(POSITIVE + NEGATIVE + ["lesion", "no lesion"], vocab_size=200, min_frequency=1)
    model = hlip_core.create_model(config, tokenizer=tok, **overrides)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = ClipLoss()
    rng = np.random.default_rng(seed)
    x, labels, _ = make_studies(256, seed=1000 + seed)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        reports = [rng.choice(POSITIVE if labels[i] else NEGATIVE) for i in idx]
        img, txt, scale, bias = model(x[idx], model.tokenize(reports))
        loss = loss_fn(img, txt, scale, bias)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
