"""Linear probes on frozen study embeddings: one logistic regression per finding.

The embeddings are the findings ones (token 0, ``encode_study``; see ``embedding.study_encoder``),
L2-normalised, of a prepared manifest; the labels are the manifest's own (``"labels": {"finding": 0
or 1}``, missing = unknown). Studies are split into a training part and a held-out part (by a hash
of the study id, by a manifest field, or by a second manifest); the probe is fitted on the first
only (scikit-learn's ``LogisticRegression`` on standardised features, the standardisation folded
into the weights) and judged on the second (AUC with a seeded bootstrap 95% interval).

A probe is saved as JSON, never pickle: finding names, weights [F, E], biases [F], the embedding
kind and dimension, and the fingerprint of the checkpoint it was made for
(``checkpoint_fingerprint``), which loading checks so that a probe is never applied to another
model's embeddings. Findings that cannot be fitted (one class in the training part) are left out
and named in ``LinearProbe.skipped`` with the reason, in the file too.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embedding import EMBEDDINGS
from .metrics import auc_per_finding, bootstrap_auc

log = logging.getLogger(__name__)

FORMAT = "hlip-linear-probe"
VERSION = 1
# the weights file a checkpoint folder is loaded from, in the loader's order of preference
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> str:
    """sha256 (hex) of a checkpoint folder's weights file (``model.safetensors``, else a released
    folder's ``pytorch_model.bin``): the same for every copy of the same weights, different for any
    other weights. Raises FileNotFoundError when the folder has neither."""
    folder = Path(checkpoint)
    path = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if path is None:
        raise FileNotFoundError(f"no weights file ({' or '.join(WEIGHT_FILES)}) in checkpoint folder {folder}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def manifest_labels(records: list[dict], findings: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(finding names, labels [n, F] float: 0/1, NaN where a study has no label) of manifest records.

    findings: the label columns to use (default: every column any record has, sorted). Raises
    ValueError when the manifest has no labels, for a named column no record has, or for a value
    other than 0/1 (booleans and 0.0/1.0 count)."""
    present = sorted({k for r in records for k in (r.get("labels") or {})})
    names = list(findings) if findings else present
    if not names:
        raise ValueError("the manifest has no labels (prepare it with --label-columns, or write \"labels\" per study)")
    if len(set(names)) != len(names):
        raise ValueError(f"a finding is named twice in {names}")
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"no study of the manifest has a label for {missing}; it has {present}")
    y = np.full((len(records), len(names)), np.nan)
    for i, r in enumerate(records):
        labels = r.get("labels") or {}
        for j, n in enumerate(names):
            v = labels.get(n)
            if v is None:
                continue
            if isinstance(v, str) or v not in (0, 1):
                raise ValueError(f"study {r['study_id']!r}: label {n!r} is {v!r}, not 0 or 1")
            y[i, j] = float(v)
    return names, y


def held_out_split(study_ids: list[str], fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """[n] bool, True = held out: a study is held out when the hash of (seed, study id) falls below
    ``fraction``, so a study's part depends on its id and the seed only (not on order or on the
    other studies; adding studies later moves none)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    out = np.zeros(len(study_ids), dtype=bool)
    for i, sid in enumerate(study_ids):
        digest = hashlib.sha256(f"{seed}\0{sid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
    return out


def field_split(records: list[dict], field_name: str, held_out_values: list[str]) -> np.ndarray:
    """[n] bool, True = held out: the studies whose manifest field ``field_name`` is one of
    ``held_out_values`` (compared as strings). Raises ValueError when a study lacks the field."""
    wanted = {str(v) for v in held_out_values}
    out = np.zeros(len(records), dtype=bool)
    for i, r in enumerate(records):
        if field_name not in r:
            raise ValueError(f"study {r['study_id']!r} has no field {field_name!r} to split by")
        out[i] = str(r[field_name]) in wanted
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


@dataclass
class LinearProbe:
    """Per-finding logistic regressions on L2-normalised study embeddings.

    names: F finding names; weights [F, E]; bias [F]; embedding: which study embedding it reads
    (one of ``embedding.EMBEDDINGS``; "findings" = token 0); fingerprint: ``checkpoint_fingerprint``
    of its checkpoint; skipped: {finding: why it has no regression}; info: how it was made."""

    names: list[str]
    weights: np.ndarray
    bias: np.ndarray
    embedding: str = "findings"
    fingerprint: str = ""
    skipped: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def probabilities(self, embeddings: np.ndarray, findings: list[str] | None = None) -> np.ndarray:
        """[n, E] normalised embeddings -> [n, F] probabilities (sigmoid of w . z + b), in the
        order of ``findings`` (default: all of ``names``). Raises ValueError for another embedding
        width or a finding the probe does not have (naming it)."""
        z = np.asarray(embeddings, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"the probe reads embeddings [n, {self.dim}], got {list(z.shape)}")
        rows = list(range(len(self.names)))
        if findings is not None:
            unknown = [f for f in findings if f not in self.names]
            if unknown:
                raise ValueError(f"the probe has no finding {unknown}; it has {self.names}")
            rows = [self.names.index(f) for f in findings]
        return _sigmoid(z @ self.weights[rows].T + self.bias[rows])

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "embedding": self.embedding, "embed_dim": self.dim,
                "fingerprint": self.fingerprint, "names": list(self.names), "weights": self.weights.tolist(),
                "bias": self.bias.tolist(), "skipped": dict(self.skipped), "info": self.info}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as JSON (floats written exactly), atomically: a temporary file beside
        ``path`` renamed into place, so a reader sees the old file or the whole new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_json(), fh, allow_nan=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None, embed_dim: int | None = None) -> "LinearProbe":
        """A probe from ``save``'s JSON, validated. fingerprint: the checkpoint's
        (``checkpoint_fingerprint``); when given, a probe made for other weights is refused.
        embed_dim: the model's embedding width; when given, a probe of another width is refused.
        Every refusal is a ValueError that names the file and the problem."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable probe file: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a linear probe written by train/probe.py (no \"format\": \"{FORMAT}\")")
        if doc.get("version") != VERSION:
            raise ValueError(f"{path} is a probe of format version {doc.get('version')!r}; this version reads {VERSION}")
        missing = [k for k in ("names", "weights", "bias", "embedding", "fingerprint") if k not in doc]
        if missing:
            raise ValueError(f"{path}: the probe lacks {missing}")
        names = doc["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"{path}: \"names\" must be distinct non-empty finding names")
        if not names:
            raise ValueError(f"{path}: the probe has no findings")
        if doc["embedding"] not in EMBEDDINGS:
            raise ValueError(f"{path}: embedding {doc['embedding']!r} is none of {EMBEDDINGS}")
        try:
            w, b = np.asarray(doc["weights"], np.float64), np.asarray(doc["bias"], np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: \"weights\" and \"bias\" must be numbers") from None
        if w.ndim != 2 or w.shape[0] != len(names) or b.shape != (len(names),):
            raise ValueError(f"{path}: {len(names)} findings but weights {list(w.shape)} and bias {list(b.shape)}")
        if doc.get("embed_dim", w.shape[1]) != w.shape[1]:
            raise ValueError(f"{path}: embed_dim {doc['embed_dim']} but weights of width {w.shape[1]}")
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError(f"{path}: the weights or biases are not all finite")
        if embed_dim is not None and w.shape[1] != embed_dim:
            raise ValueError(f"{path} reads embeddings of width {w.shape[1]}; this model's are {embed_dim} wide")
        if fingerprint is not None and doc["fingerprint"] != fingerprint:
            raise ValueError(f"{path} was made for another checkpoint (fingerprint {str(doc['fingerprint'])[:12]}..., "
                             f"this one is {fingerprint[:12]}...); fit a probe for this checkpoint with train/probe.py")
        return cls(list(names), w, b, doc["embedding"], doc["fingerprint"], dict(doc.get("skipped") or {}), doc.get("info") or {})


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, names: list[str], C: float = 1.0, max_iter: int = 5000,
              fingerprint: str = "", embedding: str = "findings") -> LinearProbe:
    """Fit one L2-regularised logistic regression per finding (scikit-learn, lbfgs) on the studies
    labelled for it; features are standardised with the training part's mean and spread, and that
    scaling is folded into the weights, so the probe is w . z + b on the embedding itself.

    embeddings [n, E]; labels [n, F] 0/1/NaN; C: inverse regularisation strength. A finding whose
    labelled training studies are all of one class is skipped, logged and named in ``skipped``;
    raises ValueError when no finding can be fitted or the shapes do not fit."""
    from sklearn.linear_model import LogisticRegression

    z = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if z.ndim != 2 or labels.shape != (z.shape[0], len(names)):
        raise ValueError(f"embeddings {list(z.shape)} and labels {list(labels.shape)} for {len(names)} findings do not fit")
    if not np.isfinite(z).all():
        raise ValueError("the embeddings are not all finite")
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    kept, weights, bias, skipped, counts = [], [], [], {}, {}
    for j, name in enumerate(names):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j].astype(int)
        if len(np.unique(y)) < 2:
            skipped[name] = f"the training part has {int(y.sum())} positive of {len(y)} labelled studies; a probe needs both classes"
            log.warning("finding %r skipped: %s", name, skipped[name])
            continue
        x = z[keep]
        mean, scale = x.mean(0), x.std(0)
        scale[scale < 1e-12] = 1.0  # a constant feature carries nothing; leave it unscaled
        clf = LogisticRegression(C=C, max_iter=max_iter).fit((x - mean) / scale, y)
        w = clf.coef_[0] / scale
        kept.append(name)
        weights.append(w)
        bias.append(clf.intercept_[0] - float(w @ mean))
        counts[name] = {"studies": int(len(y)), "positive": int(y.sum())}
    if not kept:
        raise ValueError(f"no finding can be fitted: {skipped}")
    return LinearProbe(kept, np.stack(weights), np.asarray(bias), embedding, fingerprint, skipped, {"C": C, "train": counts})


def evaluate_probe(probe: LinearProbe, embeddings: np.ndarray, labels: np.ndarray, names: list[str], n_boot: int = 1000,
                   seed: int = 0) -> dict:
    """Held-out judgement of ``probe`` on studies it never saw.

    embeddings [n, E]; labels [n, len(names)] 0/1/NaN in the order of ``names`` (the findings
    asked; those the probe skipped get no AUC). Returns {"findings": {finding: {"auc", "ci_low",
    "ci_high", "studies", "positive"} or {"skipped": reason}}, "macro_auc": mean AUC over the findings
    that have one (NaN if none)}. A finding with one class among the held-out studies has AUC NaN
    and says so in "note"."""
    labels = np.asarray(labels, dtype=np.float64)
    fitted = [n for n in names if n in probe.names]
    cols = [names.index(n) for n in fitted]
    p = probe.probabilities(embeddings, fitted)
    aucs = auc_per_finding(labels[:, cols], p, fitted)
    out = {}
    for name in names:
        if name not in probe.names:
            out[name] = {"skipped": probe.skipped.get(name, "not in the probe")}
            continue
        k = fitted.index(name)
        keep = ~np.isnan(labels[:, names.index(name)])
        y = labels[keep, names.index(name)].astype(int)
        row = {"auc": aucs[name], "ci_low": math.nan, "ci_high": math.nan, "studies": int(len(y)), "positive": int(y.sum())}
        if len(np.unique(y)) == 2:
            row["ci_low"], row["ci_high"] = bootstrap_auc(y, p[keep, k], n_boot=n_boot, seed=seed)
        else:
            row["note"] = f"the held-out part has {row['positive']} positive of {row['studies']} labelled studies: no AUC"
        out[name] = row
    valid = [r["auc"] for r in out.values() if "auc" in r and not math.isnan(r["auc"])]
    return {"findings": out, "macro_auc": float(np.mean(valid)) if valid else math.nan}
