"""Classification and retrieval metrics, from scikit-learn.

Thresholds are chosen on a validation split only (``choose_thresholds``) and then applied to the
test split (``classification_table``); the test labels never touch a threshold.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score, roc_curve

log = logging.getLogger(__name__)


def _valid_column(y: np.ndarray) -> bool:
    return len(np.unique(y[~np.isnan(y)])) == 2


def auc_per_finding(labels: np.ndarray, scores: np.ndarray, names: list[str]) -> dict[str, float]:
    """ROC AUC per column ([n, F] 0/1 labels, NaN = unknown, and [n, F] scores); NaN when a column
    has a single class."""
    out = {}
    for j, name in enumerate(names):
        y, s = labels[:, j].astype(float), scores[:, j]
        keep = ~np.isnan(y)
        out[name] = float(roc_auc_score(y[keep], s[keep])) if _valid_column(y) else float("nan")
    return out


def macro(values: dict[str, float]) -> float:
    vals = [v for v in values.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, names: list[str], rule: str = "youden") -> dict[str, float]:
    """One threshold per finding from a VALIDATION split: Youden's J (default) or the best F1."""
    out = {}
    for j, name in enumerate(names):
        y, s = labels[:, j].astype(float), scores[:, j]
        keep = ~np.isnan(y)
        y, s = y[keep], s[keep]
        if not _valid_column(y):
            out[name] = float(np.median(s)) if len(s) else 0.5
            continue
        if rule == "youden":
            fpr, tpr, thr = roc_curve(y, s)
            best = int(np.argmax(tpr - fpr))
            out[name] = float(min(thr[best], np.max(s)))
        elif rule == "f1":
            cands = np.unique(s)
            f1s = [f1_score(y, s >= t) for t in cands]
            out[name] = float(cands[int(np.argmax(f1s))])
        else:
            raise ValueError(f"unknown threshold rule {rule!r}; expected 'youden' or 'f1'")
    return out


@dataclass
class FindingRow:
    name: str
    n_pos: int
    n: int
    auc: float
    auc_low: float
    auc_high: float
    threshold: float
    balanced_accuracy: float
    f1: float
    sensitivity: float
    specificity: float


def bootstrap_auc(y: np.ndarray, s: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the AUC (resampling studies)."""
    rng = np.random.default_rng(seed)
    aucs = []
    n = len(y)
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) == 2:
            aucs.append(roc_auc_score(y[idx], s[idx]))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.quantile(aucs, alpha / 2)), float(np.quantile(aucs, 1 - alpha / 2))


def classification_table(labels: np.ndarray, scores: np.ndarray, names: list[str], thresholds: dict[str, float] | None,
                         n_boot: int = 1000, seed: int = 0) -> list[FindingRow]:
    """Per-finding AUC (with bootstrap CI) and threshold metrics at the given (validation) thresholds;
    with ``thresholds=None`` (no validation split) the threshold metrics are NaN."""
    rows = []
    for j, name in enumerate(names):
        y, s = labels[:, j].astype(float), scores[:, j]
        keep = ~np.isnan(y)
        y, s = y[keep].astype(int), s[keep]
        both = len(np.unique(y)) == 2
        auc = float(roc_auc_score(y, s)) if both else float("nan")
        lo, hi = bootstrap_auc(y, s, n_boot, seed) if both and n_boot else (float("nan"), float("nan"))
        nan = float("nan")
        row = FindingRow(name=name, n_pos=int(y.sum()), n=len(y), auc=auc, auc_low=lo, auc_high=hi, threshold=nan,
                         balanced_accuracy=nan, f1=nan, sensitivity=nan, specificity=nan)
        if thresholds is not None:
            row.threshold = float(thresholds[name])
            pred = (s >= row.threshold).astype(int)
            row.balanced_accuracy = float(balanced_accuracy_score(y, pred)) if both else nan
            row.f1 = float(f1_score(y, pred, zero_division=0))
            row.sensitivity = float(recall_score(y, pred, pos_label=1, zero_division=0))
            row.specificity = float(recall_score(y, pred, pos_label=0, zero_division=0))
        rows.append(row)
    return rows


def format_table(rows: list[FindingRow], title: str = "") -> str:
    """A plain-text table like the paper's, with the macro average last."""
    head = f"{'finding':<36} {'n+/n':>9} {'AUC':>6} {'95% CI':>13} {'BACC':>6} {'F1':>6} {'sens':>6} {'spec':>6}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        ci = f"{r.auc_low:.3f}-{r.auc_high:.3f}" if not np.isnan(r.auc_low) else "-"
        lines.append(f"{r.name[:36]:<36} {f'{r.n_pos}/{r.n}':>9} {_num(r.auc)} {ci:>13} "
                     f"{_num(r.balanced_accuracy)} {_num(r.f1)} {_num(r.sensitivity)} {_num(r.specificity)}")
    lines.append("-" * len(head))
    lines.append(f"{'macro':<36} {'':>9} {_num(_mean(rows, 'auc'))} {'':>13} {_num(_mean(rows, 'balanced_accuracy'))} "
                 f"{_num(_mean(rows, 'f1'))} {_num(_mean(rows, 'sensitivity'))} {_num(_mean(rows, 'specificity'))}")
    return "\n".join(lines)


def _mean(rows: list[FindingRow], attr: str) -> float:
    vals = [getattr(r, attr) for r in rows if not np.isnan(getattr(r, attr))]
    return float(np.mean(vals)) if vals else float("nan")


def _num(x: float) -> str:
    """A metric in a 6-wide column; '-' where it is not defined (no validation split, one class)."""
    return f"{x:6.3f}" if not np.isnan(x) else f"{'-':>6}"


def roc_png(labels: np.ndarray, scores: np.ndarray, names: list[str], path: str | Path, title: str = "") -> Path:
    """ROC curves of every finding in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6), dpi=100)
    for j, name in enumerate(names):
        y, s = labels[:, j].astype(float), scores[:, j]
        keep = ~np.isnan(y)
        if not _valid_column(y):
            continue
        fpr, tpr, _ = roc_curve(y[keep], s[keep])
        ax.plot(fpr, tpr, lw=1, label=f"{name} ({roc_auc_score(y[keep], s[keep]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title or "ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=6, loc="lower right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def recall_at_k(similarity: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Row i's correct match is column i. similarity [n, n] -> {"R@1": ..., ...}."""
    n = similarity.shape[0]
    order = np.argsort(-similarity, axis=1)
    rank = np.argmax(order == np.arange(n)[:, None], axis=1)
    return {f"R@{k}": float(np.mean(rank < k)) for k in ks}
