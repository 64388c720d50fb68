"""Study embeddings of a prepared manifest, in batches, written resumably to an embedding index.

An *item* is what gets one embedding: a whole study of the manifest (every scan), or one scan of
it as a single-scan study (the unit of benchmarks such as CT-RATE, whose labels are per volume).

Export layout (``embed_manifest``): ``OUT/parts/NNNNNN.npz`` holds the float32 embeddings and ids of
one chunk of items, each written atomically; a run that is stopped keeps its finished chunks and
the next run starts after them. When every chunk is there they are joined into the
``EmbeddingIndex`` files of ``OUT`` (``embeddings.npy``, ``ids.json``), again atomically.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.manifest import load_scan, manifest_path, read_manifest
from ..model import autocast
from .retrieval import EmbeddingIndex

log = logging.getLogger(__name__)

PARTS = "parts"
STATE = "export.json"
# which study embedding: "findings" = token 0 (``encode_study``: zero-shot findings, linear probes),
# "reports" = the last token (``encode_study_for_reports``: report search, study->report retrieval)
EMBEDDINGS = ("reports", "findings")


def study_encoder(model, embedding: str) -> Callable:
    """The model's encode function for an embedding kind: ``encode_study`` for "findings",
    ``encode_study_for_reports`` for "reports"; each maps (x [B, N, 1, D, H, W], scan_mask [B, N])
    to [B, E]. Raises ValueError naming the kinds for anything else."""
    if embedding == "findings":
        return model.encode_study
    if embedding == "reports":
        return model.encode_study_for_reports
    raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")


@dataclass
class Item:
    """One thing to embed: an id, the manifest folder, and the manifest scans that make it up."""

    item_id: str
    root: Path
    scans: list[dict]


def manifest_items(manifest, unit: str = "study", records: list[dict] | None = None) -> list[Item]:
    """Items of a manifest: one per study (``unit="study"``) or one per scan (``unit="scan"``, ids
    are the scan ids). records: already read records of that manifest (else it is read)."""
    path = manifest_path(manifest)
    records = read_manifest(path) if records is None else records
    root = path.parent
    if unit == "study":
        return [Item(r["study_id"], root, list(r["scans"])) for r in records]
    if unit == "scan":
        items, seen = [], {}
        for r in records:
            for s in r["scans"]:
                if s["scan_id"] in seen:
                    raise ValueError(f"scan id {s['scan_id']!r} appears in studies {seen[s['scan_id']]!r} and {r['study_id']!r}; "
                                     "embed by study instead")
                seen[s["scan_id"]] = r["study_id"]
                items.append(Item(s["scan_id"], root, [s]))
        return items
    raise ValueError(f"unit must be 'study' or 'scan', got {unit!r}")


def item_tensor(item: Item, max_scans: int | None = None) -> torch.Tensor:
    """[N, 1, D, H, W] float32 of an item's scans (the first ``max_scans`` when given)."""
    scans = item.scans[:max_scans] if max_scans else item.scans
    return torch.from_numpy(np.stack([load_scan(item.root, s) for s in scans]))[:, None]


def collate(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad studies [N_i, 1, D, H, W] to x [B, max N, 1, D, H, W] and scan_mask [B, max N]. The batch
    stays uint8 when every study is (the model reads uint8 as x / 255); otherwise it takes the
    first float study's dtype, and uint8 studies among them are read as x / 255."""
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"scans of one batch must share the model grid; got {sorted(shapes)}")
    n = max(t.shape[0] for t in tensors)
    dtype = next((t.dtype for t in tensors if t.dtype != torch.uint8), torch.uint8)
    x = tensors[0].new_zeros(len(tensors), n, *shapes.pop(), dtype=dtype)
    mask = torch.zeros(len(tensors), n, dtype=torch.bool)
    for i, t in enumerate(tensors):
        x[i, : t.shape[0]] = t if t.dtype == dtype else t.to(dtype) / 255.0
        mask[i, : t.shape[0]] = True
    return x, mask


@torch.no_grad()
def embed_items(model, items: Sequence[Item], batch_size: int = 4, device: str | torch.device = "cpu", precision: str = "fp32",
                max_scans: int | None = None, on_batch: Callable[[int], None] | None = None,
                embedding: str = "findings") -> np.ndarray:
    """L2-normalised study embeddings [len(items), E] float32, in item order; ``embedding`` picks
    the token ("findings" = token 0, "reports" = the last; see ``study_encoder``)."""
    encode = study_encoder(model, embedding)
    model.eval()
    device = torch.device(device)
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        x, mask = collate([item_tensor(it, max_scans) for it in batch])
        with autocast(device, precision):
            z = encode(x.to(device), mask.to(device))
        out.append(F.normalize(z.float(), dim=-1).cpu().numpy())
        if on_batch:
            on_batch(len(batch))
    if not out:
        return np.zeros((0, int(model.config["embed_dim"])), dtype=np.float32)
    return np.concatenate(out)


def _atomic_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def embed_manifest(model, manifest, out, unit: str = "study", batch_size: int = 4, chunk: int = 256,
                   device: str | torch.device = "cpu", precision: str = "fp32", max_scans: int | None = None,
                   progress: bool = True, fingerprint: str = "", embedding: str = "findings") -> EmbeddingIndex:
    """Embed every item of ``manifest`` into an EmbeddingIndex folder ``out``, resumably.

    Chunks of ``chunk`` items are written as they finish; a later call with the same arguments
    skips the finished chunks. ``fingerprint`` (e.g. the checkpoint's path and mtime) is stored and
    must match on resume, so that embeddings of two models are never mixed. ``embedding``
    ("findings": token 0, for zero-shot evaluation and probes; "reports": the last token, for report
    search) is recorded in OUT/export.json and must match too.
    Returns the loaded index (ids = study ids, or scan ids with ``unit="scan"``).
    """
    from tqdm import tqdm

    study_encoder(model, embedding)  # checks the name before any work
    items = manifest_items(manifest, unit)
    if not items:
        raise ValueError(f"manifest {manifest_path(manifest)} holds no studies")
    out = Path(out)
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    state = {"manifest": str(manifest_path(manifest).resolve()), "unit": unit, "items": len(items), "chunk": chunk,
             "max_scans": max_scans, "fingerprint": fingerprint, "embedding": embedding}
    state_file = out / STATE
    if state_file.is_file():
        old = json.loads(state_file.read_text())
        if old != state:
            changed = sorted(k for k in state if old.get(k) != state[k])
            raise ValueError(f"{out} holds an export made with other settings ({', '.join(changed)} differ); "
                             "use another output folder or delete it")
    else:
        state_file.write_text(json.dumps(state, indent=2))
    chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
    done = [k for k in range(len(chunks)) if (parts / f"{k:06d}.npz").is_file()]
    if done:
        log.info("%d of %d items already embedded in %s; continuing", sum(len(chunks[k]) for k in done), len(items), out)
    bar = tqdm(total=len(items), initial=sum(len(chunks[k]) for k in done), unit="study", disable=not progress,
               desc="embedding")
    for k, part in enumerate(chunks):
        path = parts / f"{k:06d}.npz"
        if path.is_file():
            continue
        emb = embed_items(model, part, batch_size, device, precision, max_scans, on_batch=bar.update, embedding=embedding)
        _atomic_npz(path, embeddings=emb, ids=np.array([it.item_id for it in part]))
    bar.close()
    embeddings, ids = [], []
    for k in range(len(chunks)):
        with np.load(parts / f"{k:06d}.npz", allow_pickle=False) as data:
            embeddings.append(data["embeddings"])
            ids.extend(str(i) for i in data["ids"])
    index = EmbeddingIndex.build(np.concatenate(embeddings), ids)
    index.save(out)
    return EmbeddingIndex.load(out)

