"""The text tower: a BERT encoder, pooled ([CLS] token, or the mean of the tokens), projected
linearly to the joint embedding.

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
from collections import OrderedDict
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


POOLINGS = ("cls", "mean", "sentence")
FEATURE_NORMS = (None, "standardise", "whiten")
SENTENCE_ENDS = (".", "!", "?", ":")  # tokens that close a sentence for ``sentence`` pooling


def sentence_boundary_ids(tokenizer: "ReportTokenizer") -> list[int]:
    """Ids of the tokens that end a sentence (SENTENCE_ENDS) in ``tokenizer``'s vocabulary."""
    vocab = tokenizer.hf.get_vocab()
    return sorted(vocab[t] for t in SENTENCE_ENDS if t in vocab)


class TextTower(nn.Module):
    """BERT + pooling + linear projection.

    pooling:
    - ``cls``: the [CLS] token's last state, as HLIP and open_clip's BERT towers;
    - ``mean``: the mean of the text's token states;
    - ``sentence``: every sentence is encoded on its own (attention within the sentence, positions
      counted from its start) and the text is the mean of its sentences' token means. A report is
      then the average of its statements, and a one-sentence prompt ("no midline shift") is
      encoded exactly as the same sentence inside a report, whatever else the report says.
    ``mean`` and ``sentence`` are informative from the first step even for a randomly initialised
    or masked-language-model pre-trained tower, whose [CLS] state is nearly the same for every
    report until contrastive training shapes it.
    boundary_ids: token ids that end a sentence (``sentence`` pooling; see sentence_boundary_ids).
    feature_norm: None, ``standardise`` or ``whiten``: a fixed affine map of the pooled states before
    the projection, ``(x - feature_mean) @ feature_transform`` (buffers; the identity until
    ``fit_feature_norm`` measures them on a set of texts). ``standardise`` scales each dimension to
    unit variance; ``whiten`` decorrelates them too (ZCA, regularised). For a locked tower: its
    states share a large common part and a few directions of large variance, which dominate the
    projected embedding at first; normalised, every direction starts equal and the projection
    learns which ones tell reports apart (benchmarks/RESULTS.md).
    forward(input_ids [B, L] long, attention_mask [B, L] or None) -> [B, embed_dim]; texts are
    [CLS] ... [SEP] followed by padding, as ReportTokenizer makes them.
    """

    def __init__(self, transformer: nn.Module, embed_dim: int, pad_token_id: int = 0, pooling: str = "cls",
                 boundary_ids: list[int] | tuple[int, ...] = (), feature_norm: str | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")
        if pooling == "sentence" and not boundary_ids:
            raise ValueError("sentence pooling needs the token ids that end a sentence (sentence_boundary_ids)")
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"text feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
        self.transformer = transformer
        self.pad_token_id = pad_token_id
        self.pooling = pooling
        self.register_buffer("boundary_ids", torch.tensor(sorted(boundary_ids), dtype=torch.long), persistent=False)
        hidden = transformer.config.hidden_size
        self.feature_norm = feature_norm
        if feature_norm:
            self.register_buffer("feature_mean", torch.zeros(hidden))
            self.register_buffer("feature_transform", torch.eye(hidden))
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        self.sentence_cache: SentenceCache | None = None

    @classmethod
    def from_config(cls, text_cfg: dict, embed_dim: int) -> "TextTower":
        from transformers import BertModel

        config = _bert_config(text_cfg)
        return cls(BertModel(config, add_pooling_layer=False), embed_dim, config.pad_token_id, text_cfg.get("pooling", "cls"),
                   text_cfg.get("sentence_boundary_ids", ()), text_cfg.get("feature_norm"))

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, embed_dim: int, load_weights: bool = True, pooling: str = "cls",
                       boundary_ids: list[int] | tuple[int, ...] = (), feature_norm: str | None = None) -> "TextTower":
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
        return cls(model, embed_dim, config.pad_token_id or 0, pooling, boundary_ids, feature_norm)

    def sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence index of every token [B, L] (0, 1, ... in reading order); -1 for [CLS], [SEP]
        and padding. A sentence ends with its boundary token; text after the last one is a sentence."""
        lengths = attention_mask.sum(dim=1, keepdim=True)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        content = attention_mask.bool() & (positions > 0) & (positions < lengths - 1)
        ends = torch.isin(input_ids, self.boundary_ids) & content
        index = torch.cumsum(ends.long(), dim=1) - ends.long()
        return torch.where(content, index, torch.full_like(index, -1))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The transformer's last states [B, L, hidden]; with ``sentence`` pooling each sentence is
        encoded on its own (the other tokens attend to themselves only)."""
        if self.pooling != "sentence":
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sentence = self.sentences(input_ids, attention_mask)
        L = input_ids.shape[1]
        same = (sentence[:, :, None] == sentence[:, None, :]) & (sentence[:, None, :] >= 0)
        allowed = same | torch.eye(L, dtype=torch.bool, device=input_ids.device)[None]
        positions = torch.arange(L, device=input_ids.device)[None].expand_as(input_ids)
        first = torch.ones_like(sentence, dtype=torch.bool)
        first[:, 1:] = sentence[:, 1:] != sentence[:, :-1]
        start = torch.cummax(torch.where(first, positions, torch.zeros_like(positions)), dim=1).values
        # positions counted from each sentence's start, as if it followed its own [CLS]
        position_ids = torch.where(sentence >= 0, positions - start + 1, torch.zeros_like(positions))
        return self.transformer(input_ids=input_ids, attention_mask=allowed[:, None], position_ids=position_ids).last_hidden_state

    def pool(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] states -> [B, hidden] per the tower's pooling."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            weight = attention_mask[..., None].to(hidden.dtype)
            return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        sentence = self.sentences(input_ids, attention_mask)
        count = int(sentence.max()) + 1 if sentence.numel() else 0
        if count < 1:
            raise ValueError("a text has no word between [CLS] and [SEP]")
        member = (sentence[..., None] == torch.arange(count, device=hidden.device)).to(hidden.dtype)  # [B, L, S]
        sums = torch.einsum("bls,blh->bsh", member, hidden)
        sizes = member.sum(dim=1)  # [B, S]
        present = (sizes > 0).to(hidden.dtype)
        means = sums / sizes.clamp(min=1.0)[..., None]
        return (means * present[..., None]).sum(dim=1) / present.sum(dim=1, keepdim=True).clamp(min=1.0)

    def cache_sentences(self, max_sentences: int = 200_000) -> None:
        """Keep the states of sentences already encoded and encode only new ones (``sentence``
        pooling only). A sentence's states depend on its own tokens alone, so this is exact while
        the transformer does not change and applies no dropout: for a locked tower, which then
        encodes a training report's sentences once, not in every step. The projection keeps
        training. At most ``max_sentences`` are kept (least recently used go first)."""
        if self.pooling != "sentence":
            raise ValueError(f"only sentence pooling can cache sentences, this tower pools by {self.pooling!r}")
        if any(p.requires_grad for p in self.transformer.parameters()):
            raise ValueError("the text transformer is trainable; cache sentences only of a locked tower")
        config = self.transformer.config
        dropout = max(float(getattr(config, "hidden_dropout_prob", 0.0) or 0.0),
                      float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0))
        if dropout > 0:
            raise ValueError(f"the text transformer applies dropout ({dropout}); its sentences cannot be cached")
        self.sentence_cache = SentenceCache(max_sentences)

    def _cached_pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``pool(hidden_states(...))`` for sentence pooling, through ``sentence_cache``."""
        cache = self.sentence_cache
        sentence = self.sentences(input_ids, attention_mask).tolist()
        rows = []
        for ids, index in zip(input_ids.tolist(), sentence):
            parts: dict[int, list[int]] = {}
            for token, k in zip(ids, index):
                if k >= 0:
                    parts.setdefault(k, []).append(token)
            if not parts:
                raise ValueError("a text has no word between [CLS] and [SEP]")
            rows.append([tuple(parts[k]) for k in sorted(parts)])
        keys = list(dict.fromkeys(key for row in rows for key in row))
        states = {key: cache.get(key) for key in keys if key in cache}
        missing = [key for key in keys if key not in states]
        if missing:
            for key, state in zip(missing, self._encode_sentences(missing, input_ids.device)):
                states[key] = state
                cache.put(key, state)
        return torch.stack([torch.stack([states[key] for key in row]).mean(dim=0) for row in rows])

    def _encode_sentences(self, sentences: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
        """The token-mean state of each sentence, encoded alone (positions from 1, as inside a text).
        One sentence per call, never padded: its numbers do not depend on which batch first held
        it, so a resumed run computes exactly what an uninterrupted one did."""
        states = []
        with torch.no_grad():
            for tokens in sentences:
                ids = torch.tensor([tokens], dtype=torch.long, device=device)
                positions = torch.arange(1, len(tokens) + 1, device=device)[None]
                hidden = self.transformer(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions).last_hidden_state
                states.append(hidden[0].float().mean(dim=0))
        return states

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled transformer states [B, hidden], before feature_norm and the projection."""
        if input_ids.ndim != 2:
            raise ValueError(f"expected token ids as [B, L], got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        if self.sentence_cache is not None:
            return self._cached_pool(input_ids, attention_mask)
        return self.pool(self.hidden_states(input_ids, attention_mask), input_ids, attention_mask)

    @torch.no_grad()
    def fit_feature_norm(self, pooled: torch.Tensor) -> None:
        """Set feature_norm's mean and transform from pooled states [N, hidden] of N >= 2 texts (the
        training reports). Meant for a locked transformer: the statistics hold while it is fixed.
        Directions of less than 1% of the largest variance are scaled as if they had 1% of it, so
        that noise is not blown up."""
        if not self.feature_norm:
            raise ValueError("this text tower has no feature_norm (text configuration 'feature_norm': 'standardise' or 'whiten')")
        hidden = self.feature_mean.numel()
        if pooled.ndim != 2 or pooled.shape[1] != hidden or pooled.shape[0] < 2:
            raise ValueError(f"feature_norm needs pooled states [N >= 2, {hidden}], got {tuple(pooled.shape)}")
        x = pooled.double()
        mean = x.mean(dim=0)
        cov = torch.cov(x.T)

        def floored_inverse_sqrt(variances: torch.Tensor) -> torch.Tensor:
            variances = variances.clamp(min=0)
            return 1.0 / torch.sqrt(variances + 1e-2 * variances.max() + 1e-12)

        if self.feature_norm == "standardise":
            transform = torch.diag(floored_inverse_sqrt(torch.diagonal(cov)))
        else:  # whiten (ZCA): rotate to the principal directions, scale, rotate back
            values, vectors = torch.linalg.eigh(cov)
            transform = vectors @ torch.diag(floored_inverse_sqrt(values)) @ vectors.T
        self.feature_mean.copy_(mean.to(self.feature_mean.dtype))
        self.feature_transform.copy_(transform.to(self.feature_transform.dtype))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.pooled(input_ids, attention_mask).to(self.proj.weight.dtype)
        if self.feature_norm:
            x = (x - self.feature_mean.to(x.dtype)) @ self.feature_transform.to(x.dtype)
        return self.proj(x)


class SentenceCache:
    """Sentence token ids -> that sentence's mean state, least recently used dropped past ``size``."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a sentence cache needs room for at least one sentence, got {size}")
        self.size = int(size)
        self._states: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._states

    def get(self, key: tuple[int, ...]) -> torch.Tensor:
        self._states.move_to_end(key)
        return self._states[key]

    def put(self, key: tuple[int, ...], state: torch.Tensor) -> None:
        self._states[key] = state
        self._states.move_to_end(key)
        while len(self._states) > self.size:
            self._states.popitem(last=False)


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
