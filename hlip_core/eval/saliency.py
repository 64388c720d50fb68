"""Heat maps: where in the scans a finding's score comes from.

Method: gradient-weighted attention of the last block (the interpretation published with HLIP,
in the manner of Chefer et al.'s gradient-weighted attention). The study embedding is the final
cls token, which reads the patch tokens through the last block's attention; we take that block's
cls-to-token attention A [heads, tokens], its gradient G with respect to the finding's score
(cosine to the positive prompt minus cosine to the negative prompt), and keep
``mean over heads of relu(G * A)``: tokens the cls attends to AND whose attention raises the
score. Whatever the last block's level (study, scan or slice), each token belongs to one patch of
one scan, so the map is laid back on each scan's patch grid and upsampled (trilinear) to the model
grid; the ingestion's ``to_scan_space`` then returns it in the scan's original geometry.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def relevance_maps(model, studies: torch.Tensor, scan_mask: torch.Tensor | None, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance of every patch for each finding direction.

    studies: [1, N, 1, D, H, W] one study; scan_mask [1, N] or None.
    directions: [F, E] text directions (positive minus negative prompt embedding), one per finding.
    Returns (maps [F, V, D, H, W] on the model grid, each finding's maps scaled to max 1 over the
    study; scan_share [F, V] the share of each valid scan in the finding's total relevance).
    """
    if studies.ndim != 6 or studies.shape[0] != 1:
        raise ValueError(f"relevance maps take one study [1, N, 1, D, H, W], got {tuple(studies.shape)}")
    trunk = model.visual.trunk
    attn_module = trunk.blocks[-1].attn
    was_training = model.training
    model.eval()
    attn_module.keep_attention = True
    maps, shares = [], []
    try:
        for direction in directions:
            model.zero_grad(set_to_none=True)
            x = studies.detach().clone().requires_grad_(True)  # guarantees a graph even with frozen weights
            with torch.enable_grad():
                cls, _, lay = trunk.forward_tokens(x, scan_mask)
                z = F.normalize(model.visual.head(cls), dim=-1)
                score = (z[0] * direction.to(z.dtype)).sum()
                score.backward()
            attn = attn_module.last_attention  # [P, heads, 1, L]
            cam = (attn.grad * attn).clamp(min=0).mean(dim=1)[:, 0, 1:].detach().float()  # drop the cls column
            maps_f = _to_patch_grid(cam, trunk.blocks[-1].level, lay, x.shape[-3:], trunk.patch_size)
            total = maps_f.flatten(1).sum(dim=1)
            shares.append(total / total.sum().clamp(min=1e-12))
            maps.append(maps_f / maps_f.max().clamp(min=1e-12))
    finally:
        attn_module.keep_attention = False
        attn_module.last_attention = None
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return torch.stack(maps), torch.stack(shares)


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
