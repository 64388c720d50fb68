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


@dataclass
class MicroBatch:
    studies: torch.Tensor  # [b, N, 1, D, H, W]
    scan_mask: torch.Tensor  # [b, N] bool
    tokens: tuple[torch.Tensor, torch.Tensor]  # ids [b, L], attention mask [b, L]


def _forward(model, mb: MicroBatch, amp: Callable[[], ContextManager]):
    with amp():
        study, text, scale, bias = model(mb.studies, mb.tokens, mb.scan_mask)
    return study.float(), text.float(), scale, bias


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
    text [b, E], logit scale (exp'd), logit bias or None).
    loss_fn: ClipLoss / SigLipLoss (they gather features over processes themselves).
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
        study, text, scale, bias = _forward(model, micro_batches[0], amp)
        loss = loss_fn(study, text, scale, bias)
        backward(loss)
        return [loss.detach()]

    cached_study, cached_text = [], []
    with torch.no_grad():
        for k, mb in enumerate(micro_batches):
            reseed(k)
            study, text, _, _ = _forward(model, mb, amp)
            cached_study.append(study)
            cached_text.append(text)

    losses = []
    for k, mb in enumerate(micro_batches):
        context = no_sync() if k < last else contextlib.nullcontext()
        with context:
            reseed(k)
            study, text, scale, bias = _forward(model, mb, amp)
            if k < last:
                scale = scale.detach()
                bias = bias.detach() if bias is not None else None
            all_study = torch.cat(cached_study[:k] + [study] + cached_study[k + 1 :])
            all_text = torch.cat(cached_text[:k] + [text] + cached_text[k + 1 :])
            loss = loss_fn(all_study, all_text, scale, bias)
            backward(loss)
        losses.append(loss.detach())
    return losses
