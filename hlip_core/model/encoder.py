"""HLIP's hierarchical vision transformer over all scans of a study.

Input ``[B, N, 1, D, H, W]``: B studies of N scan slots, each scan a volume of D slices of H x W.
Every block attends within one level of the study's hierarchy:

- ``slice``: the patches of one slab of one scan (one row of the depth patch grid);
- ``scan``: all patches of one scan;
- ``study``: all patches of all valid scans of the study.

Tokens are kept per valid scan as ``[V, S, T, C]`` (V valid scans in the batch, S slabs, T tokens
a slab); a level is only a different view of that tensor, plus the prefix tokens of each partition: the
cls token and, when the configuration has them, register tokens (``reg_token``). Prefix tokens are
copied into every partition when a partition splits and averaged over the partitions when they
merge. Scan slots that the ``scan_mask`` marks as padding are never embedded: slice and scan
blocks see only valid scans, study blocks mask padded positions out of attention, so a study's
embedding does not depend on what it is batched with.

Parameter names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1/fc2``, ``norm``) and the public
HLIP code (``cls_token``, ``reg_token``, ``spatial_posemb``, ``sequential_posemb``), so released
weights load by name.

Heads (``head``): ``"token"`` gives the study feature [B, C], the final cls token after ``norm``;
``"dinotxt"`` (the dino.txt pooling of the released 2025-10 models) gives one feature per prefix
token [B, 1 + R, 2C]: [p ; mean of all patch tokens of the study's valid scans], both after the
final ``norm``. As in timm's VisionTransformer with ``global_pool="token"``, the LayerNorm is
``norm`` (width C, on every token before pooling); timm's ``fc_norm`` is an Identity there and has
no weights, so a released dino.txt state dict has ``visual.trunk.norm.*`` [C] and
``visual.head.proj.weight`` [E, 2C], and no ``fc_norm`` key.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .pos_embed import check_rope, resample_spatial, rope_angles, rotate_pairs, scan_index_rows, sincos_1d, spatial_table

LEVELS = ("slice", "scan", "study")
HEADS = ("token", "dinotxt")
_RANK = {"slice": 0, "scan": 1, "study": 2}


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``.

    Set ``keep_attention = k`` (an int; ``True`` is 1) to also keep the attention of each
    partition's first k queries (its prefix tokens: cls, then registers) over its sequence, in the
    autograd graph, in ``last_attention`` [P, heads, k, L]. Only those rows are computed explicitly
    (memory grows with L, not L^2); saliency methods take their gradient with ``torch.autograd.grad``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.keep_attention: int = 0
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x: [P, L, C]; key_mask: [P, L] bool (True = attend) or None; rope: (cos, sin), each
        [P, 1, L, R / 2], the rotary angles of every token (cos 1, sin 0 for prefix tokens), which
        turn the queries and keys only (``pos_embed.rotate_pairs``), or None. Returns [P, L, C]."""
        P, L, C = x.shape
        qkv = self.qkv(x).reshape(P, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            q, k = rotate_pairs(q, *rope).to(v.dtype), rotate_pairs(k, *rope).to(v.dtype)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if x.device.type == "cpu" and q.dtype == torch.bfloat16:
            # the CPU's bf16 attention kernels are several times slower than its fp32 ones (the
            # backward most): under CPU autocast only the linear layers run in bf16
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.keep_attention:
            kq = int(self.keep_attention)
            logits = (q[:, :, :kq] * self.head_dim ** -0.5) @ k.transpose(-2, -1)  # [P, heads, kq, L]
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            attn = logits.softmax(dim=-1)
            self.last_attention = attn
            out = torch.cat([attn @ v, out[:, :, kq:]], dim=2)
        return self.proj(out.transpose(1, 2).reshape(P, L, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole sequences with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block (timm layout) that runs at one hierarchy level."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, level: str, drop_path_rate: float = 0.0):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"unknown attention level {level!r}; expected one of {LEVELS}")
        self.level = level
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x), key_mask, rope), self.drop_path_rate, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, self.training)


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3D patches: [V, in_chans, D, H, W] -> [V, d, h, w, C].

    The weights are those of a strided Conv3d (``proj``, timm's name and shape), applied as one
    matrix product over the patches: the patches do not overlap, so cutting them out is a reshape,
    and the product is 2-5x faster than the convolution on CPUs (and far faster under bf16
    autocast, where the CPU convolution kernels are slow). ``forward(x, mean, std)`` embeds
    ``(x - mean) / std`` exactly, with the standardisation folded into the weights instead of
    made as a second copy of the input.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        """x: float intensities in [0, 1], or uint8 in [0, 255] (read as x / 255, the way prepared
        arrays are stored: a quarter of the memory and copies until here)."""
        V, C, D, H, W = x.shape
        pd, ph, pw = self.patch_size
        d, h, w = D // pd, H // ph, W // pw
        patches = x.reshape(V, C, d, pd, h, ph, w, pw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(V, d, h, w, C * pd * ph * pw)
        weight, bias = fold_standardisation(self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias, x.dtype,
                                            mean, std)
        if not patches.is_floating_point():
            patches = patches.to(weight.dtype)
        return F.linear(patches, weight, bias)


def fold_standardisation(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, mean: float, std: float):
    """(weight, bias) of a linear layer (bias None: none) that reads raw input of ``dtype`` (uint8
    as x / 255) as if it were standardised to (x - mean) / std: the standardisation folded into the
    weights, so the input needs no second, standardised copy."""
    scale = 255.0 if dtype == torch.uint8 else 1.0
    if mean == 0.0 and std == 1.0 and scale == 1.0:
        return weight, bias
    # W (x / scale - m) / s + b = (W / (scale s)) x + (b - (m / s) sum(W))
    shift = (mean / std) * weight.sum(dim=1)
    return weight / (std * scale), -shift if bias is None else bias - shift


class MLPPatchEmbed3D(nn.Module):
    """A two-stage (hierarchical MLP) patch embedding: [V, in_chans, D, H, W] -> [V, d, h, w, C].

    Each patch is cut into sub-patches of ``sub_patch`` voxels. Every sub-patch is embedded on its
    own (``sub``: linear to ``channels``, then GELU), and the features of all sub-patches of a patch
    are merged into its token by ``proj`` (linear), after the hMLP stem of Touvron et al. (2022):
    the non-linearity lets a token say *that* a sub-patch holds a small bright or dark focus,
    wherever in the patch it lies, which one linear map of the whole patch can only approximate.
    ``means`` (linear, from the mean intensity of every sub-patch) adds each sub-patch's plain
    brightness, how much CSF or tissue it holds, to the token. Tokens never mix across patches, so
    position tables, patch dropout and the attention levels see the same token grid as with
    ``PatchEmbed3D``.

    ``forward(x, mean, std)`` embeds ``(x - mean) / std`` with the standardisation folded into the
    weights, and reads uint8 as ``x / 255``, as ``PatchEmbed3D`` does.
    """

    def __init__(self, patch_size: tuple[int, int, int], in_chans: int, dim: int, sub_patch: tuple[int, int, int],
                 channels: int):
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sub_patch = tuple(int(s) for s in sub_patch)
        if len(self.sub_patch) != 3 or any(s < 1 or p % s for p, s in zip(self.patch_size, self.sub_patch)):
            raise ValueError(f"the stem's sub_patch {list(sub_patch)} must be 3 sizes that divide the patch size "
                             f"{list(self.patch_size)}")
        if int(channels) < 1:
            raise ValueError(f"the stem needs at least one channel per sub-patch, got {channels}")
        self.counts = tuple(p // s for p, s in zip(self.patch_size, self.sub_patch))
        n_sub = self.counts[0] * self.counts[1] * self.counts[2]
        self.sub = nn.Linear(in_chans * self.sub_patch[0] * self.sub_patch[1] * self.sub_patch[2], int(channels))
        self.proj = nn.Linear(n_sub * int(channels), dim)
        self.means = nn.Linear(n_sub * in_chans, dim, bias=False)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        V, C, D, H, W = x.shape
        d, h, w = (n // p for n, p in zip((D, H, W), self.patch_size))
        (a, b, c), (s1, s2, s3) = self.counts, self.sub_patch
        # sub-patches [V, d, h, w, a*b*c, C*s1*s2*s3], cut before the conversion (a uint8 copy)
        subs = x.reshape(V, C, d, a, s1, h, b, s2, w, c, s3).permute(0, 2, 5, 8, 3, 6, 9, 1, 4, 7, 10)
        subs = subs.reshape(V, d, h, w, a * b * c, C * s1 * s2 * s3)
        weight, bias = fold_standardisation(self.sub.weight, self.sub.bias, x.dtype, mean, std)
        if not subs.is_floating_point():
            subs = subs.to(weight.dtype)
        tokens = self.proj(F.gelu(F.linear(subs, weight, bias)).reshape(V, d, h, w, -1))
        means = subs.reshape(V, d, h, w, a * b * c, C, -1).mean(dim=-1).reshape(V, d, h, w, -1)
        return tokens + F.linear(means, *fold_standardisation(self.means.weight, self.means.bias, x.dtype, mean, std))


def make_patch_embed(patch_size: tuple[int, int, int], in_chans: int, dim: int, stem: dict | None = None) -> nn.Module:
    """The patch embedding a configuration's ``vision.stem`` asks for: none (or kind "linear") is
    ``PatchEmbed3D``, HLIP's and timm's; ``{"kind": "mlp", "sub_patch": [d, h, w], "channels": n}``
    is ``MLPPatchEmbed3D``."""
    stem = dict(stem or {})
    kind = stem.pop("kind", "linear")
    if kind == "linear":
        if stem:
            raise ValueError(f"the linear stem takes no options, got {sorted(stem)}")
        return PatchEmbed3D(patch_size, in_chans, dim)
    if kind == "mlp":
        unknown = set(stem) - {"sub_patch", "channels"}
        if unknown or "sub_patch" not in stem:
            raise ValueError(f"the mlp stem takes sub_patch (required) and channels; got {sorted(stem)}")
        return MLPPatchEmbed3D(patch_size, in_chans, dim, tuple(stem["sub_patch"]), int(stem.get("channels", 32)))
    raise ValueError(f"unknown stem kind {kind!r}; expected 'linear' or 'mlp'")


@dataclass
class _Layout:
    """Where the valid scans of a batch sit: B studies of N slots, V valid scans of S x T tokens."""

    batch: int
    slots: int
    slabs: int
    tokens: int
    scan_mask: torch.Tensor  # [B, N] bool
    study_of_scan: torch.Tensor  # [V] index of the study each valid scan belongs to
    scans_per_study: torch.Tensor  # [B] float
    padded: bool  # some slot is padding
    grid: tuple[int, int, int] = (0, 0, 0)  # (d, h, w) patch grid of every scan
    positions: torch.Tensor | None = None  # [V, S, T] flat patch index of every token in its scan (rotary models)

    @property
    def valid(self) -> int:
        return self.study_of_scan.numel()


@dataclass
class LastBlockInput:
    """What the last block reads: its sequences [P, L, C] at its level, their key mask, the layout."""

    seq: torch.Tensor
    level: str
    key_mask: torch.Tensor | None
    lay: _Layout
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # the last level's rotary (cos, sin)

    def detach(self) -> "LastBlockInput":
        return LastBlockInput(self.seq.detach(), self.level, self.key_mask, self.lay, self.rope)


class HierarchicalViT(nn.Module):
    """The HLIP image trunk. ``forward`` returns the study feature: [B, C] (final cls after LayerNorm)
    for ``head="token"``, [B, 1 + num_registers, 2C] for ``head="dinotxt"`` (see the module docstring).

    levels: one of ``slice``/``scan``/``study`` per block (the schedule is configuration).
    img_size: the (D, H, W) the position table is built for; other sizes are resampled.
    max_scans: rows of the scan-index table; 1 means single-scan studies (no scan-index table).
    scan_posemb: whether multi-scan studies get the scan-index table (``sequential_posemb``) added;
    None means ``max_scans > 1``. False is the released ``ablate_seqposemb`` models: several scans
    per study, the spatial table only (then ``max_scans`` only bounds the scans of a training study).
    num_registers: register tokens (``reg_token`` [1, R, C]), prefix tokens after the cls token.
    head: ``"token"`` (cls token) or ``"dinotxt"`` (every prefix token with the patch mean).
    patch_dropout: fraction of patch tokens dropped in training, the same count in every partition
    of the finest level used by the schedule, so partitions still tile the study.
    input_mean, input_std: scans come in as [0, 1] intensities (or uint8, read as x / 255) and are
    standardised to (x - input_mean) / input_std by the patch embedding, as the public HLIP
    training did (the mean of ImageNet's channel means and standard deviations); released weights
    expect it.
    stem: the patch embedding (``make_patch_embed``): None for HLIP's linear one (released weights
    have it), or ``{"kind": "mlp", "sub_patch": [d, h, w], "channels": n}`` for ``MLPPatchEmbed3D``.
    rope: None, or ``{"base": b}`` for rotary positions (the released ``ablate_rope`` models): in
    every block, at every level, the queries and keys of each patch token are turned by its
    (depth, row, col) patch index in its own scan (``pos_embed.rope_angles``); prefix tokens are
    not turned, and the spatial table is still added to the tokens as without rope.
    """

    def __init__(
        self,
        img_size: tuple[int, int, int],
        patch_size: tuple[int, int, int],
        levels: list[str],
        width: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        max_scans: int = 40,
        in_chans: int = 1,
        drop_path_rate: float = 0.0,
        patch_dropout: float = 0.0,
        input_mean: float = 0.449,
        input_std: float = 0.226,
        stem: dict | None = None,
        scan_posemb: bool | None = None,
        num_registers: int = 0,
        head: str = "token",
        rope: dict | None = None,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        if int(num_registers) < 0:
            raise ValueError(f"num_registers must be 0 or more, got {num_registers}")
        if scan_posemb is None:
            scan_posemb = max_scans > 1
        if scan_posemb and max_scans < 2:
            raise ValueError(f"a scan-index table needs max_scans >= 2, got {max_scans}")
        for i, (s, p) in enumerate(zip(img_size, patch_size)):
            if s % p:
                raise ValueError(f"img_size {tuple(img_size)} is not divisible by patch_size {tuple(patch_size)} (axis {i})")
        self.img_size = tuple(img_size)
        self.patch_size = tuple(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(img_size, patch_size))
        self.levels = list(levels)
        self.width = width
        self.max_scans = max_scans
        self.head = head
        self.num_registers = int(num_registers)
        self.num_prefix_tokens = 1 + self.num_registers
        self.num_features = 2 * width if head == "dinotxt" else width
        self.in_chans = in_chans
        self.patch_dropout = patch_dropout
        self.input_mean, self.input_std = float(input_mean), float(input_std)
        self.grad_checkpointing = False
        self.patch_embed = make_patch_embed(self.patch_size, in_chans, width, stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.reg_token = nn.Parameter(torch.zeros(1, self.num_registers, width)) if self.num_registers else None
        self.spatial_posemb = nn.Parameter(spatial_table(width, self.grid_size), requires_grad=False)
        if scan_posemb:
            table = sincos_1d(width, torch.arange(max_scans, dtype=torch.float64))[None]
            self.sequential_posemb = nn.Parameter(table, requires_grad=False)
        else:
            self.sequential_posemb = None
        rates = torch.linspace(0, drop_path_rate, len(levels), device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, level, rate) for level, rate in zip(self.levels, rates)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        # rotary positions: settings only, no tensors (the angles are made from the positions)
        self.rope = check_rope(rope, width // num_heads)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    # -- input checks -------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor, scan_mask: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 6:
            raise ValueError(
                f"expected studies as [B, N, {self.in_chans}, D, H, W] (B studies, N scans), got a tensor of rank {x.ndim} "
                f"with shape {tuple(x.shape)}"
            )
        B, N, C, D, H, W = x.shape
        if C != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channel(s) per scan, got {C} (shape {tuple(x.shape)})")
        for name, size, p in zip("DHW", (D, H, W), self.patch_size):
            if size % p:
                raise ValueError(f"scan size {name}={size} is not divisible by the patch size {p} (patch {self.patch_size})")
        if scan_mask is None:
            return torch.ones(B, N, dtype=torch.bool, device=x.device)
        if scan_mask.shape != (B, N):
            raise ValueError(f"scan_mask must be [B, N] = {[B, N]}, got {list(scan_mask.shape)}")
        scan_mask = scan_mask.to(device=x.device, dtype=torch.bool)
        empty = (~scan_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"scan_mask marks no valid scan for study index(es) {empty}; every study needs at least one scan")
        return scan_mask

    # -- level transitions --------------------------------------------------------------------

    def _partitions(self, level: str, lay: _Layout) -> int:
        return {"slice": lay.valid * lay.slabs, "scan": lay.valid, "study": lay.batch}[level]

    def _merge_cls(self, cls: torch.Tensor, src: str, dst: str, lay: _Layout) -> torch.Tensor:
        """Average the prefix copies of finer partitions into the coarser level. cls: [P, K, C]."""
        K, C = cls.shape[-2:]
        if src == "slice":
            cls = cls.view(lay.valid, lay.slabs, K, C).mean(dim=1)
            if dst == "scan":
                return cls
        # scan -> study: mean over the valid scans of each study only
        out = cls.new_zeros(lay.batch, K, C).index_add_(0, lay.study_of_scan, cls)
        return out / lay.scans_per_study[:, None, None].to(cls.dtype)

    def _split_cls(self, cls: torch.Tensor, src: str, dst: str, lay: _Layout) -> torch.Tensor:
        """Copy each partition's prefix tokens into the finer partitions it splits into. cls: [P, K, C]."""
        if src == "study":
            cls = cls[lay.study_of_scan]
        if dst == "slice":
            cls = cls[:, None].expand(-1, lay.slabs, -1, -1).reshape(-1, *cls.shape[-2:])
        return cls

    def _to_sequences(self, patches: torch.Tensor, cls: torch.Tensor, level: str, lay: _Layout):
        """Assemble the [P, K + L, C] sequences of a level from patch tokens [V, S, T, C] and the
        prefix tokens [P, K, C]."""
        V, S, T, C = patches.shape
        if level == "slice":
            seq = patches.reshape(V * S, T, C)
        elif level == "scan":
            seq = patches.reshape(V, S * T, C)
        else:
            if lay.padded:
                full = patches.new_zeros(lay.batch * lay.slots, S * T, C)
                full[lay.scan_mask.flatten()] = patches.reshape(V, S * T, C)
                seq = full.view(lay.batch, lay.slots * S * T, C)
            else:
                seq = patches.reshape(lay.batch, lay.slots * S * T, C)
        return torch.cat([cls, seq], dim=1)

    def _from_sequences(self, x: torch.Tensor, level: str, lay: _Layout):
        """Inverse of ``_to_sequences``: patches [V, S, T, C] and prefix tokens [P, K, C]."""
        K = self.num_prefix_tokens
        cls, seq = x[:, :K], x[:, K:]
        C = x.shape[-1]
        if level == "study":
            seq = seq.reshape(lay.batch * lay.slots, lay.slabs * lay.tokens, C)
            if lay.padded:
                seq = seq[lay.scan_mask.flatten()]
        return seq.reshape(lay.valid, lay.slabs, lay.tokens, C), cls

    def _study_key_mask(self, lay: _Layout) -> torch.Tensor | None:
        if not lay.padded:
            return None
        per_slot = lay.scan_mask[:, :, None].expand(-1, -1, lay.slabs * lay.tokens).reshape(lay.batch, -1)
        cls = per_slot.new_ones(lay.batch, self.num_prefix_tokens)
        return torch.cat([cls, per_slot], dim=1)

    # -- forward ------------------------------------------------------------------------------

    def embed(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, _Layout]:
        """Patch + position embedding of the valid scans: tokens [V, S, T, C] and the batch layout."""
        scan_mask = self._check_input(x, scan_mask)
        B, N = scan_mask.shape
        if self.training and self.sequential_posemb is not None and N > self.max_scans:
            raise ValueError(
                f"{N} scans per study but the model was built for at most {self.max_scans} in training "
                f"(max_scans); sample fewer scans per study"
            )
        if self.max_scans == 1 and N > 1:
            raise ValueError(f"this configuration takes single-scan studies (max_scans=1), got {N} scans per study")
        flat_mask = scan_mask.flatten()
        padded = not bool(flat_mask.all())
        vols = x.flatten(0, 1)
        if padded:
            vols = vols[flat_mask]
        tokens = self.patch_embed(vols, self.input_mean, self.input_std)
        V, d, h, w, C = tokens.shape
        pos = resample_spatial(self.spatial_posemb, (d, h, w))[0]
        tokens = tokens + pos.to(tokens.dtype)
        if self.sequential_posemb is not None:
            rows = scan_index_rows(self.sequential_posemb, N, self.training)  # [N, C]
            slot = torch.arange(N, device=x.device).expand(B, N).flatten()[flat_mask]
            tokens = tokens + rows[slot][:, None, None, None, :].to(tokens.dtype)
        study_of_scan = torch.arange(B, device=x.device).repeat_interleave(N)[flat_mask]
        has_slice = "slice" in self.levels
        slabs = d if has_slice else 1
        tokens = tokens.reshape(V, slabs, -1, C)
        positions = None
        if self.rope is not None:
            positions = torch.arange(d * h * w, device=x.device).reshape(1, slabs, -1).expand(V, -1, -1)
        if self.training and self.patch_dropout > 0:
            tokens, positions = self._drop_patches(tokens, positions)
        lay = _Layout(B, N, slabs, tokens.shape[2], scan_mask, study_of_scan, scan_mask.sum(dim=1).float(), padded, (d, h, w),
                      positions)
        return tokens, lay

    def _drop_patches(self, tokens: torch.Tensor, positions: torch.Tensor | None = None):
        """Keep the same random subset size in every finest partition (slab or scan). Only patch
        tokens are dropped: the prefix tokens (cls, registers) join later, in ``_to_sequences``.
        Returns the kept tokens and the kept tokens' positions [V, S, keep] (None if none given)."""
        V, S, T, C = tokens.shape
        keep = max(1, int(round(T * (1.0 - self.patch_dropout))))
        idx = torch.rand(V, S, T, device=tokens.device).argsort(dim=-1)[..., :keep]
        kept = tokens.gather(2, idx[..., None].expand(-1, -1, -1, C))
        return kept, None if positions is None else positions.gather(2, idx)

    def _rope_table(self, lay: _Layout, dtype: torch.dtype) -> torch.Tensor | None:
        """[cos | sin] of the rotary angles of every patch token, [V, S, T, R] (R / 2 angles), in
        float64 for float64 models and float32 otherwise; None without rotary positions."""
        if self.rope is None:
            return None
        angles = rope_angles(lay.positions, lay.grid, self.blocks[0].attn.head_dim, self.rope["base"])
        table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(table_dtype)

    def _rope_for_level(self, table: torch.Tensor | None, level: str, lay: _Layout):
        """The (cos, sin) [P, 1, K + L, R / 2] of a level's sequences from ``_rope_table``'s table:
        prefix tokens are not turned (cos 1, sin 0). None without rotary positions."""
        if table is None:
            return None
        half = table.shape[-1] // 2
        P, K = self._partitions(level, lay), self.num_prefix_tokens
        still = torch.cat([table.new_ones(P, K, half), table.new_zeros(P, K, half)], dim=-1)
        seq = self._to_sequences(table, still, level, lay)[:, None]
        return seq[..., :half], seq[..., half:]

    def forward_tokens(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, _Layout]:
        """Run all blocks. Returns (the study's prefix tokens [B, K, C] (K = 1 + num_registers; cls
        first) after the final norm, patch tokens [V, S, T, C] after the final norm, the layout)."""
        return self.forward_last(self.forward_until_last(x, scan_mask))

    def forward_until_last(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> "LastBlockInput":
        """Every block but the last, and the level transition into the last: what the last block
        reads. Saliency keeps it to score new findings by re-running only the last block."""
        patches, lay = self.embed(x, scan_mask)
        level = self.levels[0]
        prefix = self.cls_token if self.reg_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        cls = prefix.expand(self._partitions(level, lay), -1, -1).to(patches.dtype)
        seq = self._to_sequences(patches, cls, level, lay)
        study_mask = self._study_key_mask(lay)
        table = self._rope_table(lay, patches.dtype)
        ropes = {level: self._rope_for_level(table, level, lay)}  # one (cos, sin) per level, made once
        last = len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):
            if blk.level != level:
                patches, cls = self._from_sequences(seq, level, lay)
                if _RANK[blk.level] > _RANK[level]:
                    cls = self._merge_cls(cls, level, blk.level, lay)
                else:
                    cls = self._split_cls(cls, level, blk.level, lay)
                level = blk.level
                seq = self._to_sequences(patches, cls, level, lay)
                if level not in ropes:
                    ropes[level] = self._rope_for_level(table, level, lay)
            if i == last:
                break
            seq = self._run_block(blk, seq, study_mask if level == "study" else None, ropes[level])
        return LastBlockInput(seq, level, study_mask if level == "study" else None, lay, ropes[level])

    def forward_last(self, state: "LastBlockInput") -> tuple[torch.Tensor, torch.Tensor, _Layout]:
        """The last block and the final norm, from ``forward_until_last``'s output; returns as
        ``forward_tokens``."""
        seq = self._run_block(self.blocks[-1], state.seq, state.key_mask, state.rope)
        patches, cls = self._from_sequences(seq, state.level, state.lay)
        if state.level != "study":
            cls = self._merge_cls(cls, state.level, "study", state.lay)
        return self.norm(cls), self.norm(patches), state.lay

    def _run_block(self, blk: Block, seq: torch.Tensor, mask: torch.Tensor | None, rope=None) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, seq, mask, rope, use_reentrant=False)
        return blk(seq, mask, rope)

    def patch_mean(self, patches: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """Mean of all patch tokens [V, S, T, C] of each study's valid scans -> [B, C]."""
        per_scan = patches.flatten(1, 2).sum(dim=1)  # [V, C]
        total = per_scan.new_zeros(lay.batch, per_scan.shape[-1]).index_add_(0, lay.study_of_scan, per_scan)
        count = lay.scans_per_study * (patches.shape[1] * patches.shape[2])
        return total / count[:, None].to(total.dtype)

    def pool(self, prefix: torch.Tensor, patches: torch.Tensor, lay: _Layout, mean: torch.Tensor | None = None) -> torch.Tensor:
        """The study feature from ``forward_tokens``'s output: [B, C] (cls) for the token head;
        [B, K, 2C] = [prefix token ; patch mean] for the dino.txt head (``mean`` [B, C]: the patch
        mean if already computed)."""
        if self.head == "token":
            return prefix[:, 0]
        if mean is None:
            mean = self.patch_mean(patches, lay)
        return torch.cat([prefix, mean[:, None].expand(-1, prefix.shape[1], -1)], dim=-1)

    def forward(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, 1, D, H, W], float in [0, 1] or uint8 in [0, 255]; scan_mask: [B, N] bool
        (True = real scan) or None. Returns [B, C] (token head) or [B, K, 2C] (dino.txt head)."""
        return self.pool(*self.forward_tokens(x, scan_mask))


class VisualTower(nn.Module):
    """Trunk + projection head, named as in open_clip's TimmModel (``trunk``, ``head.proj`` of shape
    [embed_dim, trunk.num_features]). Returns [B, E] (token head) or [B, K, E] (dino.txt head)."""

    def __init__(self, trunk: HierarchicalViT, embed_dim: int, proj_dropout: float = 0.0):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential()
        self.head.add_module("drop", nn.Dropout(proj_dropout))
        self.head.add_module("proj", nn.Linear(trunk.num_features, embed_dim, bias=False))

    def forward(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.trunk(x, scan_mask))
