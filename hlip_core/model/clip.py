"""The HLIP CLIP model: a hierarchical study encoder and a text tower in one embedding space."""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoder import HierarchicalViT, VisualTower
from .registry import get_config
from .text import ReportTokenizer, TextTower, sentence_boundary_ids


def build_trunk(vision: dict) -> HierarchicalViT:
    """The image trunk of a configuration's ``vision`` section (keys as in ``registry.get_config``;
    ``head``, ``num_registers``, ``scan_posemb`` and ``rope`` select the released 2025-10 architectures)."""
    return HierarchicalViT(
        img_size=tuple(vision["img_size"]),
        patch_size=tuple(vision["patch_size"]),
        levels=list(vision["levels"]),
        width=int(vision["width"]),
        num_heads=int(vision["num_heads"]),
        mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
        max_scans=int(vision.get("max_scans", 40)),
        drop_path_rate=float(vision.get("drop_path", 0.0)),
        patch_dropout=float(vision.get("patch_dropout", 0.0)),
        input_mean=float(vision.get("input_mean", 0.449)),
        input_std=float(vision.get("input_std", 0.226)),
        stem=vision.get("stem"),
        scan_posemb=vision.get("scan_posemb"),
        num_registers=int(vision.get("num_registers", 0)),
        head=vision.get("head", "token"),
        rope=vision.get("rope"),
    )


class HLIPModel(nn.Module):
    """Image tower ``visual`` (trunk + head), text tower ``text``, ``logit_scale`` (and
    ``logit_bias`` for SigLIP), as in open_clip, plus the tokenizer and the configuration.

    ``config`` is the full configuration dict (see ``registry.get_config``); it may carry a
    ``preprocess`` section (the ingestion settings the model was trained with) that travels with
    every checkpoint.
    """

    def __init__(self, config: dict, tokenizer: ReportTokenizer | None = None, text_tower: TextTower | None = None):
        super().__init__()
        self.config = copy.deepcopy(config)
        embed_dim = int(config["embed_dim"])
        self.visual = VisualTower(build_trunk(config["vision"]), embed_dim)
        if text_tower is None:
            text_cfg = dict(config["text"])
            if tokenizer is not None:
                text_cfg["vocab_size"] = len(tokenizer)
                self.config["text"]["vocab_size"] = len(tokenizer)
                if text_cfg.get("pooling") == "sentence" and not text_cfg.get("sentence_boundary_ids"):
                    text_cfg["sentence_boundary_ids"] = sentence_boundary_ids(tokenizer)
                    self.config["text"]["sentence_boundary_ids"] = text_cfg["sentence_boundary_ids"]
            text_tower = TextTower.from_config(text_cfg, embed_dim)
        self.text = text_tower
        self.tokenizer = tokenizer
        loss = config.get("loss", "clip")
        siglip = loss == "siglip"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None
        # dual models: the report-level temperature, log scale (released as ``logit_bias``)
        self.report_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if loss == "dual" else None

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        if enable:
            self.text.transformer.gradient_checkpointing_enable()
        else:
            self.text.transformer.gradient_checkpointing_disable()

    def encode_study_tokens(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Studies [B, N, 1, D, H, W] (see ``encode_study``) -> one embedding per prefix token
        [B, T, embed_dim]: T = 1 for a cls-token head; for a dino.txt head, token 0 (cls) and the
        register tokens after it. Token 0 is the sentence-level (zero-shot) embedding, the last token
        the report-level one (``encode_study_for_reports``); both are the same when T = 1. A caller
        that needs both embeds once here and slices, instead of calling the two one-token methods."""
        z = self.visual(x, scan_mask)
        if z.ndim == 2:
            z = z[:, None]
        return F.normalize(z, dim=-1) if normalize else z

    def encode_study(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """Studies [B, N, 1, D, H, W], float in [0, 1] or uint8 in [0, 255] (scan_mask [B, N] bool,
        True = real scan) -> [B, embed_dim]: the zero-shot (findings) embedding, token 0."""
        return self.encode_study_tokens(x, scan_mask, normalize)[:, 0]

    def encode_study_for_reports(self, x: torch.Tensor, scan_mask: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
        """As ``encode_study`` but the embedding for report search and study->report retrieval: the
        last prefix token (the register token of a dual model; token 0 otherwise) -> [B, embed_dim].
        Its temperature is ``report_scale()``."""
        return self.encode_study_tokens(x, scan_mask, normalize)[:, -1]

    def report_scale(self) -> torch.Tensor:
        """exp() of the log temperature of study<->report similarity: ``report_logit_scale`` for a dual
        model, ``logit_scale`` otherwise (a 0-dim tensor)."""
        scale = self.report_logit_scale if self.report_logit_scale is not None else self.logit_scale
        return scale.exp()

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; build it with one, or pass token ids to encode_text")
        ids, mask = self.tokenizer(texts)
        return ids.to(self.device), mask.to(self.device)

    def encode_text(self, tokens, normalize: bool = True) -> torch.Tensor:
        """Text as token ids [B, L] (padding = the tokenizer's pad id), an (ids, mask) pair, or raw
        strings (tokenized with the model's tokenizer) -> [B, embed_dim]."""
        if isinstance(tokens, str) or (isinstance(tokens, (list, tuple)) and tokens and isinstance(tokens[0], str)):
            ids, mask = self.tokenize(tokens)
        elif isinstance(tokens, (tuple, list)):
            ids, mask = tokens
        else:
            ids, mask = tokens, None
        z = self.text(ids, mask)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, studies: torch.Tensor, tokens, scan_mask: torch.Tensor | None = None):
        """Returns (study features [B, E], text features [B, E], logit scale (exp), logit bias or None)."""
        return (
            self.encode_study(studies, scan_mask),
            self.encode_text(tokens),
            self.logit_scale.exp(),
            self.logit_bias,
        )


def create_model(config_name: str, tokenizer: ReportTokenizer | None = None, text_folder: str | None = None, **overrides) -> HLIPModel:
    """Build a model from a named configuration (see ``list_configs``) with optional overrides.

    tokenizer: a ReportTokenizer (e.g. from ``train_wordpiece``); sets the text vocabulary size.
    text_folder: a local Hugging Face model folder (BiomedBERT...) to use as the text tower, with its
    own tokenizer; nothing is downloaded.
    """
    config = get_config(config_name, **overrides)
    text_tower = None
    if text_folder is not None:
        pooling = config["text"].get("pooling", "cls")
        if tokenizer is None:
            tokenizer = ReportTokenizer.load(text_folder, int(config["text"].get("context_length", 256)))
        boundaries = sentence_boundary_ids(tokenizer) if pooling == "sentence" else []
        text_tower = TextTower.from_hf_folder(text_folder, int(config["embed_dim"]), pooling=pooling, boundary_ids=boundaries,
                                              feature_norm=config["text"].get("feature_norm"))
        if boundaries:
            config["text"]["sentence_boundary_ids"] = boundaries
        config["text"].update(
            hidden=text_tower.transformer.config.hidden_size,
            layers=text_tower.transformer.config.num_hidden_layers,
            heads=text_tower.transformer.config.num_attention_heads,
            intermediate=text_tower.transformer.config.intermediate_size,
            vocab_size=text_tower.transformer.config.vocab_size,
            max_positions=text_tower.transformer.config.max_position_embeddings,
            hf_config=text_tower.transformer.config.to_dict(),
        )
    return HLIPModel(config, tokenizer=tokenizer, text_tower=text_tower)


def autocast(device: torch.device | str, precision: str = "fp32"):
    """Context for mixed precision on any device: 'fp32' (no autocast) or 'bf16'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16). There bf16
    autocast is faster than fp32; on other CPUs PyTorch emulates bf16 and it is slower."""
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, name, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    return False
