"""Zero-shot evaluation on a held-out manifest during training: AUC per finding and macro AUC."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.manifest import load_scan, manifest_path, read_manifest, stack_scans
from ..eval.embedding import collate as pad_studies
from ..eval.metrics import auc_per_finding, macro
from ..eval.zeroshot import PromptSet, ZeroShotClassifier, load_prompt_set
from ..model import autocast
from .distributed import DistEnv

log = logging.getLogger(__name__)


@dataclass
class HeldOut:
    """Held-out studies with labels for each finding of a prompt set."""

    records: list[dict]
    root: Path
    prompts: PromptSet
    labels: np.ndarray  # [n, F] 0/1, NaN where unknown
    skipped: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.prompts.findings]


def load_held_out(manifest: str | os.PathLike, prompts: str | os.PathLike) -> HeldOut:
    """The studies of ``manifest`` and their labels for the findings of the prompt set ``prompts``."""
    prompt_set = load_prompt_set(prompts)
    if prompt_set.mode != "binary":
        raise ValueError(f"prompt set {prompt_set.name!r} is {prompt_set.mode}; training evaluation takes binary findings")
    records = read_manifest(manifest)
    columns = [f.column or f.name for f in prompt_set.findings]
    labels = np.full((len(records), len(columns)), np.nan)
    for i, r in enumerate(records):
        for j, c in enumerate(columns):
            v = (r.get("labels") or {}).get(c)
            if v is not None:
                labels[i, j] = float(v)
    unknown = [c for j, c in enumerate(columns) if np.isnan(labels[:, j]).all()]
    if unknown:
        raise ValueError(f"held-out manifest {manifest_path(manifest)} has no label for finding column(s) {unknown}")
    return HeldOut(records, manifest_path(manifest).parent, prompt_set, labels)


def _study_tensor(held: HeldOut, record: dict, max_scans: int) -> torch.Tensor:
    arrays = [load_scan(held.root, s, mmap=False, as_float=False) for s in record["scans"][:max_scans]]
    return torch.from_numpy(stack_scans(arrays))[:, None]  # uint8 [0, 255] (the model reads x / 255) or float32 [0, 1]


@torch.no_grad()
def embed_held_out(model, held: HeldOut, device: torch.device, precision: str, batch_size: int, max_scans: int,
                   env: DistEnv = DistEnv()) -> tuple[np.ndarray, np.ndarray]:
    """Normalised embeddings [n, E] of the held-out studies (NaN rows for studies that failed to load)
    and a [n] bool array of which loaded. Processes split the studies and share the results."""
    n = len(held.records)
    mine = list(range(env.rank, n, env.world))
    embed_dim = int(model.config["embed_dim"])
    out = torch.full((n, embed_dim), float("nan"))
    for start in range(0, len(mine), batch_size):
        rows, studies = [], []
        for i in mine[start : start + batch_size]:
            try:
                studies.append(_study_tensor(held, held.records[i], max_scans))
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - reported, the evaluation goes on
                log.warning("held-out study %s skipped: %s: %s", held.records[i]["study_id"], type(exc).__name__, exc)
        if not rows:
            continue
        x, mask = pad_studies(studies)
        with autocast(device, precision):
            z = model.encode_study(x.to(device), mask.to(device))
        out[rows] = F.normalize(z.float(), dim=-1).cpu()
    if env.distributed:
        # each row was filled by one process and is NaN on the others: sum the filled rows
        counts = (~torch.isnan(out[:, 0])).float().to(device)
        values = torch.nan_to_num(out, nan=0.0).to(device)
        dist.all_reduce(values)
        dist.all_reduce(counts)
        out = values.cpu()
        out[counts.cpu() == 0] = float("nan")
    ok = ~torch.isnan(out[:, 0])
    return out.numpy(), ok.numpy()


def zero_shot_auc(model, held: HeldOut, device: torch.device, precision: str = "fp32", batch_size: int = 4,
                  max_scans: int = 40, env: DistEnv = DistEnv()) -> dict:
    """{"auc": {finding: AUC}, "macro_auc": float, "studies": n evaluated} for ``model`` (eval mode
    inside, the previous mode restored)."""
    was_training = model.training
    model.eval()
    try:
        z, ok = embed_held_out(model, held, device, precision, batch_size, max_scans, env)
        scores = ZeroShotClassifier(model, templates=held.prompts.templates).scores(torch.from_numpy(z[ok]), held.prompts.findings)
    finally:
        model.train(was_training)
    aucs = auc_per_finding(held.labels[ok], scores["cosine"].numpy(), held.names)
    return {"auc": aucs, "macro_auc": macro(aucs), "studies": int(ok.sum())}


def format_auc_table(result: dict, title: str = "") -> str:
    """Plain-text table of a ``zero_shot_auc`` result, macro AUC last."""
    width = max([len(k) for k in result["auc"]] + [len("macro AUC")])
    lines = [title] if title else []
    lines.append(f"{'finding':<{width}}   AUC")
    lines += [f"{name:<{width}}  {auc:.3f}" for name, auc in result["auc"].items()]
    lines.append(f"{'macro AUC':<{width}}  {result['macro_auc']:.3f}   ({result['studies']} held-out studies)")
    return "\n".join(lines)
