"""The text tower: a BERT encoder, [CLS] pooled, projected linearly to the joint embedding.

Two ways to get one:

- from a Hugging Face model folder the user has (BiomedBERT, CXR-BERT...), read with
  ``local_files_only`` so nothing is ever downloaded;
- from a small BERT configuration plus a WordPiece vocabulary trained on the user's own reports
  (``train_wordpiece``), when no pretrained text model is at hand.

Names follow open_clip's ``HFTextEncoder`` (``transformer.*``, ``proj``), so released HLIP
checkpoints map onto this module by name.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _bert_config(text_cfg: dict):
    from transformers import BertConfig

    if text_cfg.get("hf_config"):
        # a tower that came from a Hugging Face folder keeps that folder's exact configuration
        return BertConfig.from_dict(dict(text_cfg["hf_config"]))
    return BertConfig(
        vocab_size=int(text_cfg["vocab_size"]),
        hidden_size=int(text_cfg["hidden"]),
        num_hidden_layers=int(text_cfg["layers"]),
        num_attention_heads=int(text_cfg["heads"]),
        intermediate_size=int(text_cfg["intermediate"]),
        max_position_embeddings=int(text_cfg.get("max_positions", 512)),
        hidden_dropout_prob=float(text_cfg.get("dropout", 0.1)),
        attention_probs_dropout_prob=float(text_cfg.get("dropout", 0.1)),
        pad_token_id=0,
    )


class TextTower(nn.Module):
    """BERT + [CLS] pooling + linear projection.

    forward(input_ids [B, L] long, attention_mask [B, L] or None) -> [B, embed_dim].
    """

    def __init__(self, transformer: nn.Module, embed_dim: int, pad_token_id: int = 0):
        super().__init__()
        self.transformer = transformer
        self.pad_token_id = pad_token_id
        self.proj = nn.Linear(transformer.config.hidden_size, embed_dim, bias=False)

    @classmethod
    def from_config(cls, text_cfg: dict, embed_dim: int) -> "TextTower":
        from transformers import BertModel

        config = _bert_config(text_cfg)
        return cls(BertModel(config, add_pooling_layer=False), embed_dim, config.pad_token_id)

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, embed_dim: int, load_weights: bool = True) -> "TextTower":
        """A tower from a local Hugging Face model folder (config.json plus weights)."""
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no Hugging Face model folder at {folder} (config.json missing)")
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            model_cls = AutoModel
        except (ValueError, KeyError):
            # custom model types (CXR-BERT) are BERTs underneath; read them as such
            config = BertConfig.from_pretrained(folder, local_files_only=True)
            model_cls = BertModel
        if load_weights:
            model = model_cls.from_pretrained(folder, config=config, local_files_only=True, add_pooling_layer=False)
        else:
            model = model_cls.from_config(config, add_pooling_layer=False) if model_cls is AutoModel else BertModel(config, add_pooling_layer=False)
        return cls(model, embed_dim, config.pad_token_id or 0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.ndim != 2:
            raise ValueError(f"expected token ids as [B, L], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(hidden[:, 0])


class ReportTokenizer:
    """Turns report text into padded token ids for the text tower.

    Wraps a Hugging Face (fast) BERT tokenizer, either loaded from a local folder or trained on the
    user's reports. ``__call__(texts)`` -> (input_ids [B, L] long, attention_mask [B, L] long).
    """

    def __init__(self, hf_tokenizer, context_length: int):
        self.hf = hf_tokenizer
        self.context_length = int(context_length)

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def pad_token_id(self) -> int:
        return int(self.hf.pad_token_id or 0)

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i} is empty; every prompt or report needs some words")
        enc = self.hf(texts, padding="longest", truncation=True, max_length=self.context_length, return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def save(self, folder: str | os.PathLike) -> None:
        self.hf.save_pretrained(str(folder))

    @classmethod
    def load(cls, folder: str | os.PathLike, context_length: int) -> "ReportTokenizer":
        from transformers import AutoTokenizer, BertTokenizer

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no tokenizer folder at {folder}")
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (ValueError, OSError, KeyError):
            if not (folder / "vocab.txt").is_file():
                raise
            tok = BertTokenizer(vocab=str(folder / "vocab.txt"), do_lower_case=True)
        return cls(tok, context_length)


def train_wordpiece(texts: Iterable[str], vocab_size: int = 4000, context_length: int = 128, min_frequency: int = 2) -> ReportTokenizer:
    """Train an uncased WordPiece vocabulary on report text (the user's own corpus).

    Returns a ReportTokenizer whose ``save`` writes a standard BERT tokenizer folder.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("cannot train a vocabulary on an empty report corpus")
    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    wp.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        wp.save_model(tmp)
        tok = BertTokenizer(vocab=os.path.join(tmp, "vocab.txt"), do_lower_case=True)
    log.info("trained a WordPiece vocabulary of %d tokens on %d texts", len(tok), len(texts))
    return ReportTokenizer(tok, context_length)
