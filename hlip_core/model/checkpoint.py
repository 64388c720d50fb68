"""Checkpoint I/O without pickle.

The project's own format is a folder:

- ``model.safetensors``: every tensor of the model;
- ``config.json``: the model configuration (with the preprocessing settings it was trained with)
  and any ``extra`` facts the caller adds;
- ``tokenizer/``: the report tokenizer (a standard BERT tokenizer folder), so the folder is
  self-contained.

Folders are written under a temporary name and renamed into place, so a reader never sees half a
checkpoint. Released HLIP checkpoints (open_clip ``.pt`` files) are read with
``torch.load(weights_only=True)`` and mapped by name by ``load_official_checkpoint``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from .clip import HLIPModel, create_model
from .registry import get_config
from .text import ReportTokenizer

log = logging.getLogger(__name__)

FORMAT = "hlip_core/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer"


class CheckpointMismatchError(ValueError):
    """Raised when checkpoint tensors do not fit the model; lists what is missing, extra or misshaped."""

    def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
        self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
        parts = [f"{what} does not match the model configuration."]
        if self.missing:
            parts.append(f"Missing keys ({len(self.missing)}): {_short(self.missing)}")
        if self.unexpected:
            parts.append(f"Unexpected keys ({len(self.unexpected)}): {_short(self.unexpected)}")
        if self.misshaped:
            parts.append(
                f"Shape mismatches ({len(self.misshaped)}): "
                + _short([f"{k} checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.misshaped])
            )
        super().__init__("\n".join(parts))


def _short(items, limit: int = 12) -> str:
    items = list(items)
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _state_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; checkpoints are small enough to copy once
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def check_state(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str, ignore=()) -> None:
    """Raise CheckpointMismatchError listing every key of ``own`` (a model's state dict; tensors may
    be on the meta device, only names and shapes are read) missing from ``state``, every key of
    ``state`` the model lacks (except names starting or ending with an ``ignore`` entry) and every
    shape that differs."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not any(k.startswith(p) or k.endswith(p) for p in ignore)]
    misshaped = [(k, state[k].shape, own[k].shape) for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(what, missing, unexpected, misshaped)


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, ignore=()) -> None:
    """Load ``state`` strictly, raising CheckpointMismatchError with every problem listed."""
    own = model.state_dict()
    check_state(own, state, what, ignore)
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _atomic_folder(folder: Path):
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"


def _swap_into_place(tmp: Path, folder: Path) -> None:
    if folder.exists():
        old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def save(model: HLIPModel, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` as a self-contained checkpoint folder (atomically). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = _atomic_folder(folder)
    tmp.mkdir()
    try:
        save_file(_state_for_saving(model), str(tmp / WEIGHTS), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "config": model.config, "extra": extra or {}}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2))
        if model.tokenizer is not None:
            model.tokenizer.save(tmp / TOKENIZER)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_config(folder: str | os.PathLike) -> dict:
    """The ``config.json`` of a checkpoint folder: {"format", "config", "extra"}."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an HLIP checkpoint folder ({CONFIG} missing)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT!r}")
    return meta


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", config_name: str | None = None) -> HLIPModel:
    """Load a checkpoint folder written by ``save``. Returns the model in eval mode on ``device``.

    config_name: when given, the checkpoint must be of that configuration (a clear error otherwise).
    A released Hugging Face folder (``open_clip_config.json``, no ``config.json``) is read by
    ``released.load_released_folder``, so every tool that loads a checkpoint takes one directly.
    """
    from safetensors.torch import load_file

    from .released import is_released_folder, load_released_folder

    folder = Path(folder)
    if is_released_folder(folder):
        return load_released_folder(folder, config_name=config_name, device=device)
    meta = read_config(folder)
    config = meta["config"]
    if config_name is not None and config.get("name") != config_name:
        raise ValueError(f"checkpoint {folder} is of configuration {config.get('name')!r}, not {config_name!r}")
    tokenizer = None
    if (folder / TOKENIZER).is_dir():
        tokenizer = ReportTokenizer.load(folder / TOKENIZER, int(config["text"].get("context_length", 256)))
    model = HLIPModel(config, tokenizer=None)
    model.tokenizer = tokenizer
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {WEIGHTS}")
    load_state_checked(model, load_file(str(weights)), f"checkpoint {folder}")
    model.extra = meta.get("extra", {})
    return model.to(device).eval()


# -- released HLIP checkpoints ------------------------------------------------------------------

# open_clip keeps these in some versions; they carry no learned state the model needs
_OFFICIAL_IGNORED = ("text.transformer.pooler.", "position_ids")


def _official_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path} cannot be read as a weights-only PyTorch checkpoint: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path} holds no state dict")
    state = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        state[k[len("module."):] if k.startswith("module.") else k] = v
    return state


def _bert_shape_from_state(state: dict[str, torch.Tensor]) -> dict:
    prefix = "text.transformer."
    emb = state.get(prefix + "embeddings.word_embeddings.weight")
    if emb is None:
        raise CheckpointMismatchError("the checkpoint", missing=[prefix + "embeddings.word_embeddings.weight"])
    layers = sorted({int(k[len(prefix + "encoder.layer."):].split(".")[0]) for k in state if k.startswith(prefix + "encoder.layer.")})
    hidden = emb.shape[1]
    return dict(
        vocab_size=emb.shape[0],
        hidden=hidden,
        layers=len(layers),
        heads=max(1, hidden // 64),
        intermediate=state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_positions=state[prefix + "embeddings.position_embeddings.weight"].shape[0],
    )


def load_official_checkpoint(path: str | os.PathLike, config_name: str | None = None, text_folder: str | None = None,
                             device: str | torch.device = "cpu") -> HLIPModel:
    """Import a released HLIP checkpoint (open_clip format) into an ``HLIPModel``.

    path: a released Hugging Face folder (``open_clip_config.json``, weights, tokenizer files; see
    ``hlip_core.model.released``: no configuration name needed, ``config_name`` if given must match)
    or the June-2025 ``.pt`` file (a ``state_dict``, possibly under ``module.``, with keys
    ``visual.trunk.*``, ``visual.head.proj.weight``, ``text.transformer.*``, ``text.proj.weight``,
    ``logit_scale`` and for SigLIP ``logit_bias``).
    config_name: for a ``.pt`` file, the published configuration it was trained with (required), e.g.
    ``vit_base_multiscan_h2_token1176``.
    text_folder: the local Hugging Face folder of its text model (BiomedBERT, or CXR-BERT's
    tokenizer for chest CT) for the tokenizer; without it the text architecture is read off the
    checkpoint's shapes and the model has no tokenizer (images can still be embedded).
    """
    from .released import is_released_folder, load_released_folder

    if is_released_folder(path):
        return load_released_folder(path, config_name=config_name, text_folder=text_folder, device=device)
    if Path(path).is_dir():
        raise FileNotFoundError(f"{path} is a folder without open_clip_config.json: not a released HLIP folder")
    if config_name is None:
        raise ValueError(f"{Path(path).name} is a single weights file: give the configuration it was trained with "
                         f"(config_name, e.g. vit_base_multiscan_h2_token1176); only released folders name their own")
    state = _official_state(path)
    overrides = {"loss": "siglip"} if "logit_bias" in state else {}
    if text_folder is not None:
        model = create_model(config_name, text_folder=text_folder, **overrides)
    else:
        config = get_config(config_name, **overrides)
        if any(k.startswith("text.transformer.") for k in state):
            config["text"].update(_bert_shape_from_state(state))
        model = HLIPModel(config)
    load_state_checked(model, state, f"checkpoint {path}", ignore=_OFFICIAL_IGNORED)
    log.info("loaded released HLIP weights from %s as %s", Path(path).name, config_name)
    return model.to(device).eval()
