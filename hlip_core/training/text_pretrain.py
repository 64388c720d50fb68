"""Masked-language-model pre-training of the text tower on the training reports, before CLIP.

HLIP's text tower is a BERT that was pre-trained by masked language modelling (BiomedBERT on
PubMed). A user without such a model gets a small BERT with a vocabulary of their own reports; from
random weights the contrastive loss learns first what the image side already separates and leaves
the subtler findings for very long (measured on the demo: benchmarks/RESULTS.md). A few hundred
steps of the same self-supervised objective BERT was made with, on the reports alone (no labels,
no images), give the tower token states that tell the report's statements apart, so that the image
side is pulled towards every finding from the first CLIP step.

    stats = pretrain_text_tower(model, reports, steps=300)   # model: an HLIPModel with a tokenizer

Reports are sentence lists; each step draws reports, shuffles their sentences as the CLIP data
does, masks 15% of the tokens (80% [MASK], 10% a random token, 10% unchanged) and predicts them with
a head whose output matrix is the word embedding (tied, as in BERT). Sentences are tokenised once,
so a step costs only the model's arithmetic. The head is dropped afterwards: the model keeps its
parameter names and checkpoint format.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)


class _MaskedLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then scores over the vocabulary through the
    word-embedding matrix (tied) plus a bias."""

    def __init__(self, embeddings: nn.Embedding, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.embeddings = embeddings
        self.bias = nn.Parameter(torch.zeros(embeddings.num_embeddings))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(hidden))), self.embeddings.weight, self.bias)


class SentenceTokens:
    """Reports as token-id lists per sentence, tokenised once; ``batch`` assembles shuffled reports.

    prefixes[i] is put before report i's sentences (e.g. "This MRI study shows: "), as in training
    (none by default). Reports without any sentence are left out.
    """

    def __init__(self, tokenizer, reports: Sequence[Sequence[str]], prefixes: Sequence[str] | None = None):
        prefixes = list(prefixes) if prefixes is not None else [""] * len(reports)
        if len(prefixes) != len(reports):
            raise ValueError(f"{len(prefixes)} prefixes for {len(reports)} reports")
        keep = [i for i, r in enumerate(reports) if r]
        reports, prefixes = [reports[i] for i in keep], [prefixes[i] for i in keep]
        hf = tokenizer.hf
        self.cls, self.sep, self.pad = int(hf.cls_token_id), int(hf.sep_token_id), int(tokenizer.pad_token_id)
        self.mask_id = int(hf.mask_token_id)
        self.vocab = len(tokenizer)
        self.context = int(tokenizer.context_length)
        self.special = sorted({self.cls, self.sep, self.pad, self.mask_id, int(hf.unk_token_id)})
        sentences = sorted({s for r in reports for s in r} | set(prefixes))
        ids = hf(sentences, add_special_tokens=False)["input_ids"]
        table = dict(zip(sentences, ids))
        self.reports = [[table[s] for s in r] for r in reports]
        self.prefixes = [table[p] for p in prefixes]
        if not any(self.reports):
            raise ValueError("no report has any sentence to pre-train the text tower on")

    def batch(self, indices: Sequence[int], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, L] and attention mask [B, L] of reports ``indices``, sentences shuffled."""
        rows = []
        for i in indices:
            body = [t for k in rng.permutation(len(self.reports[i])) for t in self.reports[i][k]]
            rows.append(([self.cls] + self.prefixes[i] + body)[: self.context - 1] + [self.sep])
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        return ids, (ids != self.pad).long()

    def masked_loss(self, model, head: nn.Module, indices: Sequence[int], rng: np.random.Generator, generator: torch.Generator,
                    device, reduction: str = "mean") -> tuple[torch.Tensor, int] | None:
        """(masked-token cross-entropy, tokens predicted) of reports ``indices``, sentences shuffled
        and tokens masked by ``rng`` and ``generator``; None when no token was masked."""
        ids, attention = self.batch(indices, rng)
        inputs, targets = mask_tokens(ids, attention, self.special, self.mask_id, self.vocab, generator)
        picked = targets != -100
        if not picked.any():
            return None
        hidden = model.text.hidden_states(inputs.to(device), attention.to(device))
        return F.cross_entropy(head(hidden[picked.to(device)]), targets[picked].to(device), reduction=reduction), int(picked.sum())


def mask_tokens(ids: torch.Tensor, attention: torch.Tensor, special: Sequence[int], mask_id: int, vocab: int,
                generator: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (inputs [B, L], targets [B, L] with -100 where nothing is predicted). The
    random replacement tokens are drawn from the vocabulary without the special ids, wherever those
    sit (BiomedBERT's [UNK], [CLS], [SEP] and [MASK] are ids 100-103, not the lowest)."""
    special_ids = torch.tensor(list(special))
    candidates = attention.bool() & ~torch.isin(ids, special_ids)
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & candidates
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (draw < 0.8)] = mask_id
    swap = chosen & (draw >= 0.8) & (draw < 0.9)
    ordinary = torch.ones(vocab, dtype=torch.bool)
    ordinary[special_ids] = False
    pool = ordinary.nonzero().flatten()
    inputs[swap] = pool[torch.randint(len(pool), (int(swap.sum()),), generator=generator)]
    return inputs, targets


@torch.no_grad()
def _held_out_loss(model, head: nn.Module, data: SentenceTokens, device, seed: int, batch_size: int = 64) -> float:
    """Masked-token cross-entropy over every held-out report, with masks fixed by ``seed``."""
    rng = np.random.default_rng([int(seed), 0x4E1D])
    generator = torch.Generator().manual_seed(int(seed) + 1)
    was_training = model.text.training
    model.text.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(data.reports), batch_size):
            scored = data.masked_loss(model, head, range(start, min(start + batch_size, len(data.reports))), rng, generator,
                                      device, reduction="sum")
            if scored is not None:
                total += float(scored[0])
                count += scored[1]
    finally:
        model.text.train(was_training)
    return total / count if count else float("nan")


def pretrain_text_tower(model, reports: Sequence[Sequence[str]], prefixes: Sequence[str] | None = None, steps: int = 300,
                        batch_size: int = 64, lr: float = 1e-3, warmup: int = 30, weight_decay: float = 0.01,
                        seed: int = 0, device: torch.device | str = "cpu", log_every: int = 100,
                        held_out: Sequence[Sequence[str]] | None = None, held_out_prefixes: Sequence[str] | None = None) -> dict:
    """Masked-language-model training of ``model.text.transformer`` (in place) on ``reports``.

    model: an HLIPModel with a tokenizer (the text tower's own). reports: one list of sentences per
    study. prefixes: text before each report's sentences (default none). held_out: reports never
    trained on, to measure the masked-token loss on before and after (optional).
    Returns {"steps", "first_loss", "last_loss", "seconds"} (the masked-token cross-entropy at the
    first step and averaged over the last tenth of the steps), plus "held_out_before" and
    "held_out_after" when held-out reports are given.
    """
    if model.tokenizer is None:
        raise ValueError("the text tower can only be pre-trained with its tokenizer; the model has none")
    if steps < 1:
        raise ValueError(f"text pre-training needs at least 1 step, got {steps}")
    data = SentenceTokens(model.tokenizer, reports, prefixes)
    bert = model.text.transformer
    config = bert.config
    head = _MaskedLMHead(bert.embeddings.word_embeddings, config.hidden_size, config.layer_norm_eps).to(device)
    params = list(bert.parameters()) + [p for n, p in head.named_parameters() if not n.startswith("embeddings.")]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)
    rng = np.random.default_rng([int(seed), 0x313D])
    generator = torch.Generator().manual_seed(int(seed))
    held = None
    stats: dict = {}
    if held_out:
        held = SentenceTokens(model.tokenizer, held_out, held_out_prefixes)
        stats["held_out_before"] = _held_out_loss(model, head, held, device, seed)
    was_training = bert.training
    bert.train()
    losses, started = [], time.perf_counter()
    try:
        for step in range(steps):
            factor = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            scored = data.masked_loss(model, head, rng.integers(0, len(data.reports), batch_size), rng, generator, device)
            if scored is None:
                continue
            loss = scored[0]
            if not torch.isfinite(loss):
                raise RuntimeError(f"text pre-training diverged at step {step + 1} (loss {float(loss)}); lower its learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
                log.info("text pre-training step %d/%d: masked-token loss %.3f", step + 1, steps, losses[-1])
    finally:
        bert.train(was_training)
    tail = losses[-max(1, len(losses) // 10):]
    stats.update(steps=steps, first_loss=losses[0] if losses else float("nan"),
                 last_loss=float(np.mean(tail)) if tail else float("nan"), seconds=time.perf_counter() - started)
    if held is not None:
        stats["held_out_after"] = _held_out_loss(model, head, held, device, seed)
    return stats
