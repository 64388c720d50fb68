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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relevance_maps(model, studies: torch.Tensor | None, scan_mask: torch.Tensor | None, directions: torch.Tensor,
                   return_embedding: bool = False, state=None):
    """Relevance of every patch for each finding direction.

    studies: [1, N, 1, D, H, W] one study; scan_mask [1, N] or None.
    directions: [F, E] text directions (positive minus negative prompt embedding), one per finding.
    state: the study's ``trunk.forward_until_last`` output, if kept from an earlier call (then
    ``studies`` may be None): only the last block runs again.
    Returns (maps [F, V, D, H, W] on the model grid, each finding's maps scaled to max 1 over the
    study; scan_share [F, V] the share of each valid scan in the finding's total relevance), and
    with ``return_embedding`` also the study's normalised embedding [E] and the ``state`` to keep.

    The blocks before the last run without a graph; the last block's cls attention reaches the
    score only through that block's tail (projection, MLP, final norm, head), so each finding's
    gradient is a small backward pass through the tail (``torch.autograd.grad`` to the attention).
    """
    trunk = model.visual.trunk
    attn_module = trunk.blocks[-1].attn
    was_training = model.training
    model.eval()
    maps, shares = [], []
    try:
        if state is None:
            if studies is None or studies.ndim != 6 or studies.shape[0] != 1:
                raise ValueError(f"relevance maps take one study [1, N, 1, D, H, W], got {None if studies is None else tuple(studies.shape)}")
            with torch.no_grad():
                state = trunk.forward_until_last(studies, scan_mask)
        attn_module.keep_attention = True
        with torch.enable_grad():
            start = state.detach()
            start.seq.requires_grad_(True)  # a graph even with frozen weights
            cls, _, lay = trunk.forward_last(start)
            z = F.normalize(model.visual.head(cls), dim=-1)
            attn = attn_module.last_attention  # [P, heads, 1, L]
            scores = z[0] @ directions.to(z.dtype).T  # [F]
            size = tuple(g * p for g, p in zip(lay.grid, trunk.patch_size))  # the model grid (D, H, W)
            for f in range(scores.shape[0]):
                (grad,) = torch.autograd.grad(scores[f], attn, retain_graph=f + 1 < scores.shape[0])
                cam = (grad * attn.detach()).clamp(min=0).mean(dim=1)[:, 0, 1:].float()  # drop the cls column
                maps_f = _to_patch_grid(cam, trunk.blocks[-1].level, lay, size, trunk.patch_size)
                total = maps_f.flatten(1).sum(dim=1)
                shares.append(total / total.sum().clamp(min=1e-12))
                maps.append(maps_f / maps_f.max().clamp(min=1e-12))
    finally:
        attn_module.keep_attention = False
        attn_module.last_attention = None
        model.train(was_training)
    out = (torch.stack(maps), torch.stack(shares))
    return out + (z[0].detach(), state) if return_embedding else out


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
