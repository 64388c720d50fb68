"""Contrastive losses, correct under ``torch.distributed``.

Each rank holds a local batch of study and text features. ``gather_features`` collects the
features of all ranks; its backward sums the gradients every rank computed for each feature and
hands each rank the part for its own features. Each rank's loss is the mean over its local rows
against all columns, so the mean of the ranks' losses equals the loss of the whole batch on one
process, and DDP's gradient averaging gives exactly the one-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_features(x: torch.Tensor) -> torch.Tensor:
    """[b, E] per rank -> [world * b, E] in rank order, differentiable. Identity on one process.
    Every rank must pass the same local batch size."""
    rank, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


class ClipLoss(nn.Module):
    """CLIP InfoNCE: mean of the study->text and text->study cross-entropies.

    forward(study_features [b, E], text_features [b, E], logit_scale (already exp'd)) -> scalar,
    the local rows' loss; the global loss is its mean over ranks.
    """

    def forward(self, study: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias=None) -> torch.Tensor:
        rank, _ = _world()
        all_study, all_text = gather_features(study), gather_features(text)
        b = study.shape[0]
        labels = torch.arange(b, device=study.device) + rank * b
        logits_study = logit_scale * study @ all_text.T
        logits_text = logit_scale * text @ all_study.T
        return (F.cross_entropy(logits_study.float(), labels) + F.cross_entropy(logits_text.float(), labels)) / 2


class SigLipLoss(nn.Module):
    """SigLIP: a sigmoid loss on every study-text pair, positives on the diagonal.

    forward(study [b, E], text [b, E], logit_scale (exp'd), logit_bias) -> scalar; normalised by the
    local batch size, so the mean over ranks equals the one-process loss.
    """

    def forward(self, study: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        if logit_bias is None:
            raise ValueError("SigLIP needs a logit bias; build the model with loss='siglip'")
        rank, _ = _world()
        all_text = gather_features(text)
        b = study.shape[0]
        logits = (logit_scale * study @ all_text.T + logit_bias).float()
        signs = -torch.ones_like(logits)
        signs[torch.arange(b, device=study.device), torch.arange(b, device=study.device) + rank * b] = 1.0
        return -F.logsigmoid(signs * logits).sum() / b


class DualClipLoss(nn.Module):
    """The loss of HLIP's ``dual`` models: the mean of two CLIP InfoNCE terms.

    forward(study_tokens [b, T, E], sentence [b, E], report [b, E], logit_scale, report_logit_scale)
    -> scalar. The sentence term pairs image token 0 with one sentence of each report at
    ``logit_scale``; the report term pairs the last image token with the whole report at
    ``report_logit_scale``; both scales already exp'd. Total = (sentence + report) / 2, as the
    reference trains them (``hlip-ablation`` train.py). Under torch.distributed each term gathers its
    features as ClipLoss does, so the mean over ranks is the one-process loss.
    """

    def __init__(self):
        super().__init__()
        self.clip = ClipLoss()

    def forward(self, study_tokens: torch.Tensor, sentence: torch.Tensor, report: torch.Tensor, logit_scale: torch.Tensor,
                report_logit_scale: torch.Tensor | None) -> torch.Tensor:
        if study_tokens.dim() != 3:
            raise ValueError(f"the dual loss needs study tokens [b, T, E], got shape {list(study_tokens.shape)}")
        if report_logit_scale is None:
            raise ValueError("the dual loss needs a report temperature; build the model with loss='dual'")
        sentence_term = self.clip(study_tokens[:, 0].contiguous(), sentence, logit_scale)
        report_term = self.clip(study_tokens[:, -1].contiguous(), report, report_logit_scale)
        return 0.5 * sentence_term + 0.5 * report_term


LOSSES = ("clip", "siglip", "dual")


def make_loss(kind: str) -> nn.Module:
    """'clip' -> ClipLoss, 'siglip' -> SigLipLoss, 'dual' -> DualClipLoss."""
    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    if kind == "dual":
        return DualClipLoss()
    raise ValueError(f"unknown loss {kind!r}; expected one of {', '.join(LOSSES)}")
