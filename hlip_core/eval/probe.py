"""Linear probes on frozen study embeddings: one logistic regression per finding.

The embeddings are the findings ones (token 0, ``encode_study``) of a prepared manifest, the labels
the manifest's own (``"labels": {"finding": 0 or 1}``, missing = unknown). The studies are split by
study id, deterministically, into a training and a held-out part; the probe is fitted on the first
(scikit-learn's LogisticRegression) and judged on the second (AUC with a bootstrap 95% CI).

A probe is saved as JSON (no pickle): finding names, weights [F, E], biases [F], the embedding kind
and the fingerprint of the checkpoint it was made for (``checkpoint_fingerprint``), which loading
checks so that a probe is never applied to another model's embeddings.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .metrics import auc_per_finding, bootstrap_auc

FORMAT = "hlip-linear-probe"
VERSION = 1


def checkpoint_fingerprint(checkpoint: str | os.PathLike) -> str:
    """sha256 (hex) of a checkpoint folder's weights file ``model.safetensors``: the same for every
    copy of the same weights, different for any other weights. Raises FileNotFoundError without one."""
    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no model.safetensors in checkpoint folder {checkpoint}")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def manifest_labels(records: list[dict], findings: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """(finding names, labels [n, F] float with 0/1 and NaN where a study has no label) of manifest
    records. findings: the label columns to use (default: every column any record has, sorted).
    Raises ValueError for a named column no record has, or a value other than 0/1."""
    present = sorted({k for r in records for k in (r.get("labels") or {})})
    names = list(findings) if findings else present
    if not names:
        raise ValueError("the manifest has no labels (prepare it with --label-columns, or write \"labels\" per study)")
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(f"no study of the manifest has a label for {missing}; it has {present}")
    y = np.full((len(records), len(names)), np.nan)
    for i, r in enumerate(records):
        for j, n in enumerate(names):
            v = (r.get("labels") or {}).get(n)
            if v is None:
                continue
            if v not in (0, 1, True, False):
                raise ValueError(f"study {r['study_id']!r}: label {n!r} is {v!r}, not 0 or 1")
            y[i, j] = float(v)
    return names, y


def held_out_split(study_ids: list[str], fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """[n] bool, True = held out: a study is held out when the hash of (seed, study id) falls below
    ``fraction``, so the split depends on nothing but the id (not on order or on other studies)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be between 0 and 1, got {fraction}")
    out = np.zeros(len(study_ids), dtype=bool)
    for i, sid in enumerate(study_ids):
        digest = hashlib.sha256(f"{seed}\0{sid}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64 < fraction
    return out


@dataclass
class LinearProbe:
    """Per-finding logistic regressions on L2-normalised study embeddings.

    names: F finding names; weights [F, E]; bias [F]; embedding: which study embedding it reads
    ("findings" = token 0); fingerprint: ``checkpoint_fingerprint`` of its checkpoint."""

    names: list[str]
    weights: np.ndarray
    bias: np.ndarray
    embedding: str = "findings"
    fingerprint: str = ""
    info: dict = field(default_factory=dict)  # how it was made (C, counts, held-out AUCs)

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, E] normalised embeddings -> [n, F] probabilities (sigmoid of w . z + b)."""
        z = np.asarray(embeddings, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != self.weights.shape[1]:
            raise ValueError(f"the probe reads embeddings [n, {self.weights.shape[1]}], got {list(z.shape)}")
        return 1.0 / (1.0 + np.exp(-(z @ self.weights.T + self.bias)))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the probe as JSON, atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, "version": VERSION, "embedding": self.embedding, "fingerprint": self.fingerprint,
               "names": list(self.names), "weights": self.weights.tolist(), "bias": self.bias.tolist(), "info": self.info}
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> "LinearProbe":
        """A probe from ``save``'s JSON. fingerprint: the checkpoint's (``checkpoint_fingerprint``);
        when given, a probe made for another checkpoint is refused with a ValueError."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a readable probe file: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a linear probe written by train/probe.py")
        w, b, names = np.asarray(doc["weights"], np.float64), np.asarray(doc["bias"], np.float64), list(doc["names"])
        if w.ndim != 2 or w.shape[0] != len(names) or b.shape != (len(names),):
            raise ValueError(f"{path}: {len(names)} findings but weights {list(w.shape)} and bias {list(b.shape)}")
        if fingerprint is not None and doc.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} was made for another checkpoint (fingerprint {str(doc.get('fingerprint'))[:12]}..., "
                             f"this one is {fingerprint[:12]}...); fit a probe for this checkpoint with train/probe.py")
        return cls(names, w, b, doc.get("embedding", "findings"), doc.get("fingerprint", ""), doc.get("info", {}))


def fit_probe(embeddings: np.ndarray, labels: np.ndarray, names: list[str], C: float = 1.0, max_iter: int = 2000,
              fingerprint: str = "", embedding: str = "findings") -> LinearProbe:
    """Fit one L2-regularised logistic regression per finding (scikit-learn, lbfgs) on the studies
    with a label for it. embeddings [n, E]; labels [n, F] 0/1/NaN. Raises ValueError naming a
    finding without both classes among its labelled studies."""
    from sklearn.linear_model import LogisticRegression

    z = np.asarray(embeddings, dtype=np.float64)
    if z.ndim != 2 or labels.shape != (z.shape[0], len(names)):
        raise ValueError(f"embeddings {list(z.shape)} and labels {list(labels.shape)} for {len(names)} findings do not fit")
    weights, bias, counts = np.zeros((len(names), z.shape[1])), np.zeros(len(names)), {}
    for j, name in enumerate(names):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j].astype(int)
        if len(np.unique(y)) < 2:
            raise ValueError(f"finding {name!r}: the training part has {int(y.sum())} positive of {len(y)} labelled studies; "
                             "a probe needs both classes")
        clf = LogisticRegression(C=C, max_iter=max_iter).fit(z[keep], y)
        weights[j], bias[j] = clf.coef_[0], clf.intercept_[0]
        counts[name] = {"studies": int(len(y)), "positive": int(y.sum())}
    return LinearProbe(list(names), weights, bias, embedding, fingerprint, {"C": C, "train": counts})


def evaluate_probe(probe: LinearProbe, embeddings: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Held-out judgement: {finding: {"auc", "ci_low", "ci_high", "studies", "positive"}} and
    "macro_auc" (mean over findings with an AUC). labels [n, F] in the probe's finding order."""
    p = probe.probabilities(embeddings)
    aucs = auc_per_finding(labels, p, probe.names)
    out = {}
    for j, name in enumerate(probe.names):
        keep = ~np.isnan(labels[:, j])
        y = labels[keep, j].astype(int)
        lo, hi = bootstrap_auc(y, p[keep, j], n_boot=n_boot, seed=seed) if len(np.unique(y)) == 2 else (math.nan, math.nan)
        out[name] = {"auc": aucs[name], "ci_low": lo, "ci_high": hi, "studies": int(len(y)), "positive": int(y.sum())}
    valid = [r["auc"] for r in out.values() if not math.isnan(r["auc"])]
    return {"findings": out, "macro_auc": float(np.mean(valid)) if valid else math.nan}
