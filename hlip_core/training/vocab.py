"""A report vocabulary that is a pure function of the reports.

``hlip_core.train_wordpiece`` (Hugging Face ``tokenizers``) breaks ties between equally frequent
merges in hash order, so two trainings on the same reports can give different vocabularies, and
two runs of the same seed would then not train the same model. This builder is deterministic:
the special tokens, every character seen (alone and as a ``##`` continuation), then whole words
by decreasing frequency (ties alphabetical). A standard BERT WordPiece tokenizer reads it: known
words are one token, other words fall back to their characters.
"""
from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from collections import Counter
from typing import Iterable

from ..model.text import SPECIAL_TOKENS, ReportTokenizer

_PIECES = re.compile(r"\w+|[^\w\s]")


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFD", text.lower())
    return "".join(c for c in text if unicodedata.category(c) != "Mn")  # strip accents, as uncased BERT does


def report_vocabulary(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2) -> list[str]:
    """The vocabulary (tokens in id order) of an uncased WordPiece tokenizer for ``texts``."""
    words: Counter[str] = Counter()
    for text in texts:
        if isinstance(text, str):
            words.update(_PIECES.findall(_normalise(text)))
    if not words:
        raise ValueError("cannot build a vocabulary from an empty report corpus")
    chars = sorted({c for w in words for c in w})
    vocab = list(SPECIAL_TOKENS) + chars + ["##" + c for c in chars]
    taken = set(vocab)
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
    for word, count in ranked:
        if len(vocab) >= vocab_size:
            break
        if count >= min_frequency and word not in taken:
            vocab.append(word)
            taken.add(word)
    return vocab


def tokenizer_from_vocabulary(vocab: list[str], context_length: int) -> ReportTokenizer:
    """A ReportTokenizer (BERT, uncased) over ``vocab``."""
    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "vocab.txt")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write("\n".join(vocab) + "\n")
        tokenizer = ReportTokenizer(BertTokenizer(vocab=path, do_lower_case=True), context_length)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"a vocabulary of {len(vocab)} tokens was read back as {len(tokenizer)}")
    return tokenizer
