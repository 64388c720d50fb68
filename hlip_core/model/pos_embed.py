"""Fixed sin-cos position embeddings for scans (3D) and for the scan index in a study (1D).

The tables are not learned. They are stored in the state dict (under the names the released
HLIP checkpoints use: ``spatial_posemb`` [1, d, h, w, C] and ``sequential_posemb`` [1, S, C]) so
that a checkpoint carries exactly the table it was trained with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of positions.

    positions: any shape, float. Returns [positions.numel(), dim] as ``[sin | cos]`` halves.
    """
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / (10000.0 ** omega)
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """3D sin-cos table for a (d, h, w) patch grid: [1, d, h, w, dim].

    A third of the channels encodes each axis, in the order (w, h, d) as in the public HLIP code,
    so that released weights see the table they were trained with.
    """
    if dim % 6:
        raise ValueError(f"3D sin-cos embedding needs a width divisible by 6, got {dim}")
    d, h, w = grid
    zz, yy, xx = torch.meshgrid(
        torch.arange(d, dtype=torch.float64),
        torch.arange(h, dtype=torch.float64),
        torch.arange(w, dtype=torch.float64),
        indexing="ij",
    )
    third = dim // 3
    emb = torch.cat([sincos_1d(third, xx), sincos_1d(third, yy), sincos_1d(third, zz)], dim=1)
    return emb.reshape(1, d, h, w, dim)


def sincos_depth_plane(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Spatial sin-cos table for widths a 3-way split does not fit (ViT-L's 1024): [1, d, h, w, dim],
    the sum of a full-width 1D table over depth and a 2D table over the plane (half the channels
    for w, half for h), the layout of the 2025-10 HLIP code. Released weights carry their own table
    in the state dict; this only initialises models built here."""
    if dim % 4:
        raise ValueError(f"the depth + plane sin-cos embedding needs a width divisible by 4, got {dim}")
    d, h, w = grid
    depth = sincos_1d(dim, torch.arange(d, dtype=torch.float64))  # [d, dim]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    plane = torch.cat([sincos_1d(dim // 2, xx), sincos_1d(dim // 2, yy)], dim=1).reshape(h, w, dim)
    return (depth[:, None, None, :] + plane[None]).reshape(1, d, h, w, dim)


def spatial_table(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """The spatial table a new model starts with: ``sincos_3d`` when the width divides by 6, else
    ``sincos_depth_plane``. [1, d, h, w, dim]."""
    return sincos_3d(dim, grid) if dim % 6 == 0 else sincos_depth_plane(dim, grid)


def resample_spatial(table: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Resample a [1, d, h, w, C] table to another patch grid (trilinear), for other scan sizes."""
    if tuple(table.shape[1:4]) == tuple(grid):
        return table
    work = torch.promote_types(table.dtype, torch.float32)  # float64 tables stay float64
    out = F.interpolate(table.permute(0, 4, 1, 2, 3).to(work), size=tuple(grid), mode="trilinear", align_corners=False)
    return out.permute(0, 2, 3, 4, 1).to(table.dtype)


def scan_index_rows(table: torch.Tensor, num_scans: int, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows of the [1, S, C] scan-index table for ``num_scans`` scan slots: [num_scans, C].

    Training draws ``num_scans`` distinct random rows (scan order carries no meaning in a study);
    evaluation takes the first rows, and interpolates the table linearly when a study has more
    scans than it has rows.
    """
    rows = table.shape[1]
    if training:
        if num_scans > rows:
            raise ValueError(
                f"a study has {num_scans} scan slots but the scan-index table has {rows} rows; "
                f"sample at most {rows} scans per study in training (or raise max_scans)"
            )
        perm = torch.randperm(rows, generator=generator)[:num_scans].to(table.device)
        return table[0, perm]
    if num_scans <= rows:
        return table[0, :num_scans]
    out = F.interpolate(table.permute(0, 2, 1).float(), size=num_scans, mode="linear", align_corners=False)
    return out.permute(0, 2, 1)[0].to(table.dtype)


# -- rotary position embedding (the ``ablate_rope`` released models) -----------------------------
#
# A patch token at (depth, row, col) of its scan's patch grid has its query and key turned, in
# every block and at every level, by angles that grow with that position. Each attention head's
# channels are cut into [depth | height | width | rest]: the first three parts have
# ``rope_axis_dim(head_dim)`` channels each (the largest even number <= head_dim // 3), the rest is
# left as it is. Inside an axis part of n channels, the pair of channels (2j, 2j + 1) turns by
# ``position * base ** (-2j / n)``. Prefix tokens (cls, registers) are never turned. The angles are
# computed from the positions on every forward pass: they are neither parameters nor buffers, so a
# rotary model's state dict has exactly the keys of the same model without it.

ROPE_OPTIONS = ("base",)


def check_rope(rope: dict | None, head_dim: int) -> dict | None:
    """The rotary settings of a configuration's ``vision.rope`` ({"base": float}, None: no rope),
    checked against the head width; returns them with defaults filled in."""
    if rope is None or rope is False:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"vision.rope must be an object such as {{\"base\": 10000.0}} or null, got {rope!r}")
    unknown = sorted(set(rope) - set(ROPE_OPTIONS))
    if unknown:
        raise ValueError(f"vision.rope takes {list(ROPE_OPTIONS)}; unknown option(s) {unknown}")
    base = float(rope.get("base", 10000.0))
    if not base > 1.0:
        raise ValueError(f"vision.rope.base must be greater than 1, got {base}")
    if rope_axis_dim(head_dim) < 2:
        raise ValueError(f"rotary positions need at least 6 channels per attention head, got {head_dim}")
    return {"base": base}


def rope_axis_dim(head_dim: int) -> int:
    """Channels of one head given to each of the depth, height and width rotations."""
    return 2 * ((head_dim // 3) // 2)


def rope_angles(positions: torch.Tensor, grid: tuple[int, int, int], head_dim: int, base: float) -> torch.Tensor:
    """Rotation angles of patch tokens from their flat index in the (d, h, w) patch grid of their scan.

    positions: integer tensor of any shape [...] (index = (depth * h + row) * w + col).
    Returns float64 [..., 3 * rope_axis_dim(head_dim) // 2]: one angle per turned channel pair,
    depth pairs first, then height, then width.
    """
    _, h, w = grid
    n = rope_axis_dim(head_dim)
    freqs = base ** (-torch.arange(0, n, 2, dtype=torch.float64, device=positions.device) / n)  # [n / 2]
    depth = torch.div(positions, h * w, rounding_mode="floor").to(torch.float64)
    row = torch.div(positions, w, rounding_mode="floor").remainder(h).to(torch.float64)
    col = positions.remainder(w).to(torch.float64)
    return torch.cat([depth[..., None] * freqs, row[..., None] * freqs, col[..., None] * freqs], dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn channel pairs (2j, 2j + 1) of the first 2 * cos.shape[-1] channels of x [..., L, D] by
    the angles whose cos/sin are given ([..., L, R / 2], broadcast over x's leading dims); the other
    channels pass unchanged. Computed in the dtype of cos (float32 or float64)."""
    r = 2 * cos.shape[-1]
    head, tail = x[..., :r].to(cos.dtype), x[..., r:]
    even, odd = head[..., 0::2], head[..., 1::2]
    turned = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([turned, tail.to(cos.dtype)], dim=-1) if tail.shape[-1] else turned
