"""Training checkpoints: everything needed to continue a run, without pickle.

A checkpoint is a folder ``OUT/checkpoints/step_00001234/``::

    model/                    the model as ``hlip_core.save`` writes it (weights, config, tokenizer)
    optimizer.safetensors     AdamW's moment tensors, keyed by parameter name
    rng.safetensors           each process's torch (and CUDA) random state
    state.json                step, optimiser hyper-parameters, schedule, grad scaler, data
                              position, numpy/python random states of each process, options, metrics

It is written under a temporary name and renamed into place when complete: a folder named
``step_*`` is always whole, so ``--resume auto`` takes the newest one. Tensors are read with
safetensors, the rest with json: loading a checkpoint never unpickles anything.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from ..model import HLIPModel, load, save

log = logging.getLogger(__name__)

FORMAT = "hlip_core.training/1"
STATE = "state.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
MODEL = "model"
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message says which and why."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# -- random states ---------------------------------------------------------------------------

def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """This process's random states: (JSON-able numpy and python states, torch state tensors)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    n = meta["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


# -- optimiser -------------------------------------------------------------------------------

def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """AdamW's state keyed by parameter NAME (groups must carry 'names'): (JSON part, tensors)."""
    state = optimizer.state_dict()
    groups, tensors, scalars = [], {}, {}
    for group in state["param_groups"]:
        names = group["names"]
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k not in ("params", "names")}
        groups.append({"names": names, "hyper": hyper})
        for index, name in zip(group["params"], names):
            for key, value in state["state"].get(index, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous().clone()
                else:
                    scalars[f"{name}::{key}"] = value
    return {"groups": groups, "scalars": scalars}, tensors


def load_optimizer_state(optimizer: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of ``optimizer_state`` for an optimiser built over the same named parameters."""
    own = optimizer.state_dict()
    saved_names = [g["names"] for g in meta["groups"]]
    own_names = [g["names"] for g in own["param_groups"]]
    if saved_names != own_names:
        flat_saved = {n for g in saved_names for n in g}
        flat_own = {n for g in own_names for n in g}
        raise CheckpointError(
            "the optimiser's parameters differ from the checkpoint's (was the model or the text-tower locking changed?); "
            f"only in the checkpoint: {sorted(flat_saved - flat_own)[:5]}, only now: {sorted(flat_own - flat_saved)[:5]}"
        )
    new_state = {"state": {}, "param_groups": []}
    for group, saved in zip(own["param_groups"], meta["groups"]):
        hyper = dict(saved["hyper"])
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        new_state["param_groups"].append({**group, **hyper})
        for index, name in zip(group["params"], group["names"]):
            entry = {}
            for key, value in tensors.items():
                pname, _, skey = key.rpartition("::")
                if pname == name:
                    entry[skey] = value
            for key, value in meta["scalars"].items():
                pname, _, skey = key.rpartition("::")
                if pname == name:
                    entry[skey] = value
            if entry:
                new_state["state"][index] = entry
    optimizer.load_state_dict(new_state)


# -- whole checkpoints -----------------------------------------------------------------------

def save_checkpoint(root: str | os.PathLike, step: int, model: HLIPModel, optimizer: torch.optim.Optimizer,
                    state: dict, rng_meta: list[dict], rng_tensors: list[dict[str, torch.Tensor]],
                    keep: int | None = None) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically and return it. ``state``: the JSON-able rest (schedule,
    scaler, sampler, options, metrics...). rng_meta / rng_tensors: one entry per process, rank order.
    keep: then delete all but the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save(model, tmp / MODEL)
        opt_meta, opt_tensors = optimizer_state(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER), metadata={"format": FORMAT})
        rng_flat = {f"rank{r}.{k}": v.contiguous() for r, ts in enumerate(rng_tensors) for k, v in ts.items()}
        save_file(rng_flat, str(tmp / RNG), metadata={"format": FORMAT})
        doc = {"format": FORMAT, "step": int(step), **state, "optimizer": opt_meta, "rng": rng_meta}
        with open(tmp / STATE, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # the same step written again (a resumed run that redid it)
            old = root / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def remove_partial(root: str | os.PathLike) -> None:
    """Delete temporary folders left by a writer that was killed."""
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_checkpoint(folder: str | os.PathLike) -> dict:
    """state.json of a checkpoint, checked. Raises CheckpointError when it is not a whole checkpoint."""
    folder = Path(folder)
    path = folder / STATE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a complete training checkpoint ({STATE} missing)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg})") from None
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {doc.get('format')!r}; this version reads {FORMAT!r}")
    for name in (OPTIMIZER, RNG, MODEL):
        if not (folder / name).exists():
            raise CheckpointError(f"checkpoint {folder} lacks {name}")
    return doc


def load_checkpoint(folder: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[HLIPModel, dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(model in train mode on ``device``, state.json, optimizer tensors, rng tensors) of a checkpoint."""
    from safetensors.torch import load_file

    folder = Path(folder)
    doc = read_checkpoint(folder)
    model = load(folder / MODEL, device=device).train()
    return model, doc, load_file(str(folder / OPTIMIZER)), load_file(str(folder / RNG))


def rng_of_rank(doc: dict, rng_tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The random state a process of ``rank`` saved, or None when the checkpoint had fewer processes."""
    if rank >= len(doc["rng"]):
        return None
    prefix = f"rank{rank}."
    return doc["rng"][rank], {k[len(prefix):]: v for k, v in rng_tensors.items() if k.startswith(prefix)}
