"""One optimiser step's gradients, with gradient accumulation that is exact for a contrastive loss.

A contrastive loss couples every study of the batch with every report, so the loss of a large batch
is not the sum of the losses of its parts. As in open_clip, the features of every micro-batch are
first computed without gradients; then each micro-batch is computed again with gradients and its
features are put in place of their cached copy, the loss of the WHOLE batch is formed and
back-propagated. Each backward pass carries the gradient through one micro-batch's features, so
the sum over micro-batches is the gradient of the large-batch loss. The logit scale (and bias)
enter the loss directly, not through the features: they keep their gradient in one backward pass
only (the last), otherwise it would be counted once per micro-batch.

Random choices inside the model (dropout, drop path, patch dropout, scan-index rows) must be the
same in the cached and the recomputed pass of a micro-batch: ``reseed(k)`` is called before both
passes of micro-batch k.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn as nn


@dataclass
class MicroBatch:
    studies: torch.Tensor  # [b, N, 1, D, H, W]
    scan_mask: torch.Tensor  # [b, N] bool
    tokens: tuple[torch.Tensor, torch.Tensor]  # ids [b, L], attention mask [b, L] (dual: one sentence per study)
    report_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # dual training: the whole report, ids/mask [b, L']


class DualObjective(nn.Module):
    """The forward pass of dual training, as one module (so DistributedDataParallel can wrap it).

    forward(studies, sentence_tokens, scan_mask, report_tokens) -> (study tokens [b, T, E],
    sentence features [b, E], report features [b, E], exp(logit_scale), exp(report_logit_scale)),
    the arguments of DualClipLoss. ``model`` needs encode_study_tokens, encode_text, logit_scale and
    report_logit_scale (None is refused by the loss).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, studies, tokens, scan_mask=None, report_tokens=None):
        if report_tokens is None:
            raise ValueError("dual training needs the whole report's tokens beside the sentence's")
        m = self.model
        report_scale = getattr(m, "report_logit_scale", None)
        return (m.encode_study_tokens(studies, scan_mask), m.encode_text(tokens), m.encode_text(report_tokens),
                m.logit_scale.exp(), report_scale.exp() if report_scale is not None else None)


def _forward(model, mb: MicroBatch, amp: Callable[[], ContextManager]):
    """(features: tuple of [b, ...] tensors, scalars: tuple of scales/bias) of one micro-batch."""
    with amp():
        if mb.report_tokens is not None:
            out = model(mb.studies, mb.tokens, mb.scan_mask, mb.report_tokens)
        else:
            out = model(mb.studies, mb.tokens, mb.scan_mask)
    features = tuple(f.float() for f in out[:-2])
    return features, tuple(out[-2:])


def accumulate_gradients(
    model,
    loss_fn,
    micro_batches: Sequence[MicroBatch],
    amp: Callable[[], ContextManager] = contextlib.nullcontext,
    reseed: Callable[[int], None] | None = None,
    no_sync: Callable[[], ContextManager] | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> list[torch.Tensor]:
    """Add to ``.grad`` the gradient of the loss of all ``micro_batches`` taken as one batch.

    model: an HLIPModel (or DDP around one): model(studies, tokens, scan_mask) -> (study [b, E],
    text [b, E], logit scale (exp'd), logit bias or None); for micro-batches with ``report_tokens``
    a DualObjective (or DDP around one), whose outputs are the DualClipLoss arguments.
    loss_fn: ClipLoss / SigLipLoss / DualClipLoss (they gather features over processes themselves):
    loss_fn(*features, *scalars), the features being every output but the last two.
    no_sync: DDP's ``no_sync`` (gradients are reduced over processes in the last backward only).
    backward: how to back-propagate a loss (a grad scaler's ``scale(loss).backward()``).
    Returns the loss computed at each backward pass (detached); they are all the large-batch loss,
    so they agree to rounding when the cached and recomputed passes agree.
    """
    if not micro_batches:
        raise ValueError("a step needs at least one micro-batch")
    reseed = reseed or (lambda k: None)
    backward = backward or (lambda loss: loss.backward())
    no_sync = no_sync or contextlib.nullcontext
    last = len(micro_batches) - 1
    if last == 0:
        reseed(0)
        features, scalars = _forward(model, micro_batches[0], amp)
        loss = loss_fn(*features, *scalars)
        backward(loss)
        return [loss.detach()]

    cached: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for k, mb in enumerate(micro_batches):
            reseed(k)
            features, _ = _forward(model, mb, amp)
            cached.append(features)

    losses = []
    for k, mb in enumerate(micro_batches):
        context = no_sync() if k < last else contextlib.nullcontext()
        with context:
            reseed(k)
            features, scalars = _forward(model, mb, amp)
            if k < last:
                scalars = tuple(s.detach() if s is not None else None for s in scalars)
            whole = [torch.cat([c[i] for c in cached[:k]] + [f] + [c[i] for c in cached[k + 1 :]])
                     for i, f in enumerate(features)]
            loss = loss_fn(*whole, *scalars)
            backward(loss)
        losses.append(loss.detach())
    return losses
