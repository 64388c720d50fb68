"""A deliberately plain re-statement of HLIP's image encoder, for checking the real one.

It reads raw tensors from a state dict (open_clip / timm names), loops over every partition of
every block with explicit softmax attention, and keeps the prefix tokens (cls, then the registers
of ``reg_token`` if the state dict has one) of each partition in a dict keyed by the partition:
slice (n, s), scan (n,), study (). A partition contains another when its key is a prefix of the
other's, so "copy on split, average on merge" is spelled out literally. Without
``sequential_posemb`` in the state dict no scan-index table is added.

Rotary positions (``rope_base``): every patch token's query and key are multiplied, in every block,
by its own block-diagonal rotation matrix, written out entry by entry from the facts of the
released ``ablate_rope`` models (head channels [depth | height | width | rest], each axis part the
largest even count <= head_dim // 3, pair j of a part of n channels turned by
pos / base ** (j / (n / 2))); prefix tokens get the identity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotation(position: tuple[int, int, int], head_dim: int, base: float) -> torch.Tensor:
    """The [head_dim, head_dim] rotation of a patch at (depth, row, col), float64."""
    m = torch.eye(head_dim, dtype=torch.float64)
    n = 2 * ((head_dim // 3) // 2)
    for axis, pos in enumerate(position):
        for j in range(n // 2):
            theta = torch.tensor(pos / base ** (j / (n / 2)), dtype=torch.float64)
            a = axis * n + 2 * j
            m[a, a], m[a, a + 1] = torch.cos(theta), -torch.sin(theta)
            m[a + 1, a], m[a + 1, a + 1] = torch.sin(theta), torch.cos(theta)
    return m


def _block(sd: dict, p: str, x: torch.Tensor, heads: int, rot: torch.Tensor | None = None) -> torch.Tensor:
    """rot: [L, head_dim, head_dim] rotation of every token's query and key, or None."""
    L, C = x.shape
    h = F.layer_norm(x, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(L, 3, heads, C // heads)
    q, k, v = qkv[:, 0].transpose(0, 1), qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)
    if rot is not None:
        q = torch.einsum("lij,hlj->hli", rot, q)
        k = torch.einsum("lij,hlj->hli", rot, k)
    attn = torch.softmax(q @ k.transpose(1, 2) / (C // heads) ** 0.5, dim=-1)
    out = (attn @ v).transpose(0, 1).reshape(L, C)
    x = x + out @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
    h = F.layer_norm(x, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
    return x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]


def _keys(level: str, n_scans: int, n_slabs: int) -> list[tuple]:
    if level == "slice":
        return [(n, s) for n in range(n_scans) for s in range(n_slabs)]
    if level == "scan":
        return [(n,) for n in range(n_scans)]
    return [()]


def study_feature(sd: dict, levels: list[str], patch: tuple, heads: int, study: torch.Tensor, prefix: str = "",
                  head: str = "token", rope_base: float | None = None) -> torch.Tensor:
    """One study [N, 1, D, H, W] (valid scans only, evaluation mode) -> trunk feature: [C] (the
    final cls) for head "token"; [K, 2C], row p = [prefix token p ; mean of every patch token of
    the study], both after the final LayerNorm, for head "dinotxt". rope_base: rotary positions
    with that base in every block, or None."""
    w = sd[prefix + "patch_embed.proj.weight"]
    study = (study - 0.449) / 0.226  # the input standardisation of HLIP's training
    tok = F.conv3d(study, w, sd[prefix + "patch_embed.proj.bias"], stride=patch).permute(0, 2, 3, 4, 1)
    N, d, h, ww, C = tok.shape
    spatial = sd[prefix + "spatial_posemb"]
    if tuple(spatial.shape[1:4]) != (d, h, ww):
        spatial = F.interpolate(spatial.permute(0, 4, 1, 2, 3), size=(d, h, ww), mode="trilinear").permute(0, 2, 3, 4, 1)
    tok = tok + spatial[0]
    if prefix + "sequential_posemb" in sd:
        tok = tok + sd[prefix + "sequential_posemb"][0, :N][:, None, None, None, :]
    tokens = {(n, s): tok[n, s].reshape(h * ww, C) for n in range(N) for s in range(d)}

    def members(key):  # slabs inside a partition
        return [k for k in tokens if k[: len(key)] == key]

    start = sd[prefix + "cls_token"][0]
    if prefix + "reg_token" in sd:
        start = torch.cat([start, sd[prefix + "reg_token"][0]])
    K = start.shape[0]
    hd = C // heads
    # the rotation of every token of a slab (its depth s; row, col from its place in the slab)
    slab_rot = {} if rope_base is None else {
        s: torch.stack([rotation((s, t // ww, t % ww), hd, rope_base) for t in range(h * ww)]) for s in range(d)}
    prefix_rot = torch.eye(hd, dtype=torch.float64).expand(K, hd, hd)
    cls = {key: start for key in _keys(levels[0], N, d)}
    level = levels[0]
    for i, new_level in enumerate(levels):
        if new_level != level:
            new = {}
            for key in _keys(new_level, N, d):
                finer = [old for old in cls if old[: len(key)] == key and len(old) > len(key)]
                if finer:
                    new[key] = torch.stack([cls[o] for o in finer]).mean(0)
                else:
                    new[key] = next(cls[old] for old in cls if key[: len(old)] == old)
            cls, level = new, new_level
        for key in cls:
            slabs = members(key)
            seq = torch.cat([cls[key]] + [tokens[k] for k in slabs])
            rot = None if rope_base is None else torch.cat([prefix_rot] + [slab_rot[k[1]] for k in slabs])
            out = _block(sd, f"{prefix}blocks.{i}.", seq, heads, rot)
            cls[key] = out[:K]
            for j, k in enumerate(slabs):
                tokens[k] = out[K + j * h * ww : K + (j + 1) * h * ww]
    final = torch.stack(list(cls.values())).mean(0) if level != "study" else cls[()]

    def norm(t):
        return F.layer_norm(t, (C,), sd[prefix + "norm.weight"], sd[prefix + "norm.bias"], eps=1e-6)

    if head == "token":
        return norm(final[0])
    mean = norm(torch.cat(list(tokens.values()))).mean(0)
    return torch.cat([norm(final), mean[None].expand(K, -1)], dim=1)
