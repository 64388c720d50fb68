"""Heat maps: where in the scans a finding's score comes from.

Method: gradient-weighted attention of the last block (the interpretation published with HLIP,
in the manner of Chefer et al.'s gradient-weighted attention). The study embedding is the final
cls token, which reads the patch tokens through the last block's attention; we take that block's
cls-to-token attention A [heads, tokens], its gradient G with respect to the finding's score
(cosine to the positive prompt minus cosine to the negative prompt), and keep
``mean over heads of relu(G * A)``: tokens the cls attends to AND whose attention raises the
score. A finding that no patch supports (G * A <= 0 everywhere, typical of a "normal" finding
on a study the model reads as abnormal) gets an all-zero map: nothing in the scans raises it.
Whatever the last block's level (study, scan or slice), each token belongs to one patch of
one scan, so the map is laid back on each scan's patch grid and upsampled (trilinear) to the model
grid; the ingestion's ``to_scan_space`` then returns it in the scan's original geometry.

Which token: ``token`` picks the prefix token whose embedding is scored (0, the cls token, the
zero-shot one, by default; -1 the last, the report token of a dual model). Its own attention row
in the last block is the one used.

dino.txt heads: the embedding of prefix token p is proj(LN-ed [p ; mean of the patch tokens]), so
a finding's score reaches the scans by two paths: p's attention in the last block (the term
above), and the patch mean, in which every patch token takes part directly. The map then adds,
for each patch j, relu(g . t_j) / n: t_j its final (normed) token, n the number of patch tokens of
the study, g the gradient of the score with respect to the patch mean. Both terms are first-order
contributions to the score (an attention weight times its gradient; a token's share of the mean
times its gradient), so they are added in the same units. The map shows where the patches that
raise the score lie, through the prefix token's reading and through the pooled content.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relevance_maps(model, studies: torch.Tensor | None, scan_mask: torch.Tensor | None, directions: torch.Tensor,
                   return_embedding: bool = False, state=None, token: int = 0):
    """Relevance of every patch for each finding direction.

    studies: [1, N, 1, D, H, W] one study; scan_mask [1, N] or None.
    directions: [F, E] text directions (positive minus negative prompt embedding), one per finding.
    state: the study's ``trunk.forward_until_last`` output, if kept from an earlier call (then
    ``studies`` may be None): only the last block runs again.
    token: which prefix token's embedding is scored (0 = cls, the zero-shot embedding; -1 = the
    last, the report embedding of a dual model).
    Returns (maps [F, V, D, H, W] on the model grid, each finding's maps scaled to max 1 over the
    study; scan_share [F, V] the share of each valid scan in the finding's total relevance), and
    with ``return_embedding`` also the study's normalised embedding [E] and the ``state`` to keep.

    The blocks before the last run without a graph; the last block's cls attention reaches the
    score only through that block's tail (projection, MLP, final norm, head), so each finding's
    gradient is a small backward pass through the tail (``torch.autograd.grad`` to the attention).
    """
    trunk = model.visual.trunk
    attn_module = trunk.blocks[-1].attn
    K = trunk.num_prefix_tokens
    if trunk.head == "token" and token not in (0, -K):
        raise ValueError(f"a cls-token head embeds the cls token only; token must be 0, got {token}")
    if not -K <= token < K:
        raise ValueError(f"token {token} is outside the model's {K} prefix token(s)")
    row = token % K
    was_training = model.training
    model.eval()
    maps, shares = [], []
    try:
        if state is None:
            if studies is None or studies.ndim != 6 or studies.shape[0] != 1:
                raise ValueError(f"relevance maps take one study [1, N, 1, D, H, W], got {None if studies is None else tuple(studies.shape)}")
            with torch.no_grad():
                state = trunk.forward_until_last(studies, scan_mask)
        attn_module.keep_attention = row + 1
        with torch.enable_grad():
            start = state.detach()
            start.seq.requires_grad_(True)  # a graph even with frozen weights
            prefix, patches, lay = trunk.forward_last(start)
            dinotxt = trunk.head == "dinotxt"
            mean = trunk.patch_mean(patches, lay) if dinotxt else None
            z = F.normalize(model.visual.head(trunk.pool(prefix, patches, lay, mean)), dim=-1)
            z = z[:, row] if z.ndim == 3 else z
            attn = attn_module.last_attention  # [P, heads, row + 1, L]
            scores = z[0] @ directions.to(z.dtype).T  # [F]
            size = tuple(g * p for g, p in zip(lay.grid, trunk.patch_size))  # the model grid (D, H, W)
            inputs = (attn, mean) if dinotxt else (attn,)
            for f in range(scores.shape[0]):
                grads = torch.autograd.grad(scores[f], inputs, retain_graph=f + 1 < scores.shape[0])
                cam = (grads[0] * attn.detach()).clamp(min=0).mean(dim=1)[:, row, K:].float()  # patch columns
                maps_f = _to_patch_grid(cam, trunk.blocks[-1].level, lay, size, trunk.patch_size)
                if dinotxt:
                    maps_f = maps_f + _mean_term(grads[1], patches.detach(), lay, size, trunk.patch_size)
                total = maps_f.flatten(1).sum(dim=1)
                shares.append(total / total.sum().clamp(min=1e-12))
                maps.append(maps_f / maps_f.max().clamp(min=1e-12))
    finally:
        attn_module.keep_attention = False
        attn_module.last_attention = None
        model.train(was_training)
    out = (torch.stack(maps), torch.stack(shares))
    return out + (z[0].detach(), state) if return_embedding else out


def _mean_term(grad_mean: torch.Tensor, patches: torch.Tensor, lay, size, patch) -> torch.Tensor:
    """relu(g . t_j) / n for every patch token t_j [V, S, T, C] of the study (g = grad_mean [B, C]),
    laid on the model grid -> [V, D, H, W]."""
    n = patches.shape[1] * patches.shape[2] * lay.scans_per_study[lay.study_of_scan]  # [V]
    share = (patches.float() @ grad_mean.float()[lay.study_of_scan][:, None, :, None]).squeeze(-1)  # [V, S, T]
    share = share.clamp(min=0) / n[:, None, None]
    d, h, w = (s // p for s, p in zip(size, patch))
    grid = share.reshape(-1, 1, d, h, w)
    return F.interpolate(grid, size=tuple(size), mode="trilinear", align_corners=False)[:, 0]


def _to_patch_grid(cam: torch.Tensor, level: str, lay, size, patch) -> torch.Tensor:
    """cam rows of the last level's partitions -> [V, D, H, W] on the model grid."""
    d, h, w = (s // p for s, p in zip(size, patch))
    if level == "study":
        tokens = cam.reshape(lay.batch * lay.slots, d * h * w)
        tokens = tokens[lay.scan_mask.flatten()] if lay.padded else tokens
    else:  # scan rows [V, S*T] or slice rows [V*S, T]: both are the scans' tokens in order
        tokens = cam.reshape(lay.valid, d * h * w)
    grid = tokens.reshape(-1, 1, d, h, w)
    return F.interpolate(grid, size=tuple(size), mode="trilinear", align_corners=False)[:, 0]
