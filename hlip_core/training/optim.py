"""The optimisation recipe: AdamW parameter groups, cosine schedule with warm-up, tower freezing."""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# parameters that are scales, offsets or lookup tables: weight decay would only pull them to zero
NO_DECAY_NAMES = ("cls_token", "posemb", "pos_embed", "embeddings.", "logit_scale", "logit_bias", "report_logit_scale")


def decays(name: str, param: nn.Parameter) -> bool:
    """True for weight matrices and kernels; False for norms, biases, embeddings, cls token, logit scale/bias."""
    return param.ndim >= 2 and not any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: with and without weight decay.
    Each group also lists its parameter names (``names``), used to save the optimiser by name."""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = decay if decays(name, p) else no_decay
        target[0].append(p)
        target[1].append(name)
    return [
        {"params": decay[0], "names": decay[1], "weight_decay": weight_decay},
        {"params": no_decay[0], "names": no_decay[1], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not groups[0]["params"] and not groups[1]["params"]:
        raise ValueError("the model has no trainable parameter")
    # foreach keeps one code path on CPU and GPU; fused kernels differ in rounding between devices
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=False)


class CosineSchedule:
    """Learning rate of step s: linear warm-up to ``base_lr`` over ``warmup`` steps, then a cosine
    decay to ``min_lr`` at ``total`` steps. Stateless: ``lr(step)`` is a pure function."""

    def __init__(self, base_lr: float, total: int, warmup: int = 0, min_lr: float = 0.0):
        if total < 1:
            raise ValueError(f"a schedule needs at least 1 step, got {total}")
        self.base_lr, self.total, self.warmup, self.min_lr = float(base_lr), int(total), int(warmup), float(min_lr)

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.base_lr * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "total": self.total, "warmup": self.warmup, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        if state != self.state_dict():
            log.warning("the learning-rate schedule differs from the checkpoint's (%s now, %s then); the new one is used",
                        self.state_dict(), state)


def lock_text_tower(model: nn.Module, unlocked_layers: int = 0) -> int:
    """Freeze the text transformer of an HLIPModel except its last ``unlocked_layers`` layers; the
    projection to the joint space stays trainable. Returns the number of frozen parameters."""
    transformer = model.text.transformer
    for p in transformer.parameters():
        p.requires_grad_(False)
    layers = list(transformer.encoder.layer) if hasattr(transformer, "encoder") else []
    if unlocked_layers > len(layers):
        raise ValueError(f"cannot leave {unlocked_layers} text layers trainable: the text tower has {len(layers)}")
    for layer in layers[len(layers) - unlocked_layers :] if unlocked_layers else []:
        for p in layer.parameters():
            p.requires_grad_(True)
    frozen = sum(p.numel() for p in transformer.parameters() if not p.requires_grad)
    log.info("text tower locked: %d parameters frozen, last %d layer(s) trainable", frozen, unlocked_layers)
    return frozen


def clamp_logit_scale(model: nn.Module, max_scale: float = 100.0) -> None:
    """Keep the learned temperatures within CLIP's range: exp(logit_scale) in [1, max_scale], and
    exp(report_logit_scale) of dual models too (the reference clamps both to [0, ln 100])."""
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, math.log(max_scale))
        report = getattr(model, "report_logit_scale", None)
        if report is not None:
            report.clamp_(0.0, math.log(max_scale))
