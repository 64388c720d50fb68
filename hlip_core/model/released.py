"""Released HLIP models in their Hugging Face folder form.

A released folder holds ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg": {...}}``),
``model.safetensors`` and/or ``pytorch_model.bin`` (one state dict, open_clip key names), the
tokenizer files (``vocab.txt``, ``tokenizer.json``, ...) and a vendored copy of the authors' code
(``hlip/``, ``model_configs/``). Only the JSON, the weights and the tokenizer files are read: nothing
under the folder is imported or executed, and the ``.bin`` file is read with
``torch.load(weights_only=True)``.

The architecture is ``model_cfg.vision_cfg.timm_model_name``, which must be a configuration of the
registry of that very name. The text tower's shape is read off the weights. In ``dual`` models the
state dict's ``logit_bias`` is the report temperature (log scale) and becomes
``report_logit_scale``; in other models a ``logit_bias`` is a SigLIP bias (open_clip writes one only
when the model was trained with the SigLIP loss).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointMismatchError, _bert_shape_from_state, check_state, load_state_checked
from .clip import HLIPModel
from .registry import _base_names, get_config
from .text import ReportTokenizer

log = logging.getLogger(__name__)

OPEN_CLIP_CONFIG = "open_clip_config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
SOURCE = "released-hf-folder"
# what the released state dict may hold beyond the model's own tensors (open_clip / BERT extras)
_IGNORED = ("text.transformer.pooler.", "position_ids")


def is_released_folder(path: str | os.PathLike) -> bool:
    """True for a folder with ``open_clip_config.json`` and without this project's ``config.json``."""
    path = Path(path)
    return path.is_dir() and (path / OPEN_CLIP_CONFIG).is_file() and not (path / "config.json").is_file()


def read_released_config(folder: str | os.PathLike) -> dict:
    """The parsed ``open_clip_config.json`` of a released folder, checked for the keys the loader uses.

    Returns {"model_cfg": {...}, "preprocess_cfg": {...}}; raises ValueError naming what is missing.
    """
    path = Path(folder) / OPEN_CLIP_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a released HLIP folder ({OPEN_CLIP_CONFIG} missing)")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    model_cfg = meta.get("model_cfg") if isinstance(meta, dict) else None
    if not isinstance(model_cfg, dict):
        raise ValueError(f"{path} has no 'model_cfg' object")
    vision, text = model_cfg.get("vision_cfg"), model_cfg.get("text_cfg")
    if not isinstance(vision, dict) or not isinstance(vision.get("timm_model_name"), str):
        raise ValueError(f"{path} has no model_cfg.vision_cfg.timm_model_name")
    if not isinstance(text, dict):
        raise ValueError(f"{path} has no model_cfg.text_cfg")
    if not isinstance(model_cfg.get("embed_dim"), int):
        raise ValueError(f"{path} has no integer model_cfg.embed_dim")
    for key, expected in (("hf_pooler_type", "cls_last_hidden_state_pooler"), ("hf_proj_type", "linear")):
        if text.get(key, expected) != expected:
            raise ValueError(f"{path}: text_cfg.{key} is {text[key]!r}; this loader reads {expected!r} only")
    return {"model_cfg": model_cfg, "preprocess_cfg": meta.get("preprocess_cfg") or {}}


def released_state(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a released folder: ``model.safetensors`` if present, else
    ``pytorch_model.bin`` (weights only). Returns (state, the file read). A truncated or corrupt file
    is a ValueError naming it."""
    folder = Path(folder)
    path = folder / SAFETENSORS
    if path.is_file():
        from safetensors.torch import load_file

        try:
            raw = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types; re-raised with the file named
            raise ValueError(f"{path} cannot be read (truncated or corrupt safetensors file): {exc}") from exc
    else:
        path = folder / TORCH_BIN
        if not path.is_file():
            raise FileNotFoundError(f"released folder {folder} has neither {SAFETENSORS} nor {TORCH_BIN}")
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(f"{path} cannot be read as a weights-only PyTorch file (truncated or corrupt?): {exc}") from exc
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ValueError(f"{path} holds no plain state dict of tensors")
    return dict(raw), path


def load_released_folder(folder: str | os.PathLike, config_name: str | None = None, text_folder: str | os.PathLike | None = None,
                         device: str | torch.device = "cpu") -> HLIPModel:
    """An ``HLIPModel`` from a released Hugging Face folder, every tensor checked (never a partial load).

    config_name: when given, must equal the folder's ``timm_model_name``.
    text_folder: a tokenizer folder to use instead of the folder's own tokenizer files.
    Returns the model in eval mode on ``device``; ``model.config["released"]`` records the released
    facts (timm name, source, preprocess_cfg) and ``model.config["preprocess"]`` the released preset.
    Raises KeyError for an unknown architecture, CheckpointMismatchError for tensors that do not fit,
    ValueError for unreadable files or inconsistent settings.
    """
    folder = Path(folder)
    meta = read_released_config(folder)
    model_cfg = meta["model_cfg"]
    name = model_cfg["vision_cfg"]["timm_model_name"]
    if config_name is not None and config_name != name:
        raise ValueError(f"released folder {folder} holds {name!r}, not {config_name!r}")
    if name not in _base_names():
        raise KeyError(f"released folder {folder}: unknown timm_model_name {name!r}; known: {', '.join(_base_names())}")
    config = get_config(name)
    if int(model_cfg["embed_dim"]) != int(config["embed_dim"]):
        raise ValueError(f"released folder {folder}: embed_dim {model_cfg['embed_dim']} but {name} has {config['embed_dim']}")
    state, weights = released_state(folder)
    what = f"released weights {weights}"
    dual = config.get("loss", "clip") == "dual"
    if dual:
        if "logit_bias" not in state:
            raise CheckpointMismatchError(what + " (a dual model keeps its report temperature as logit_bias)", missing=["logit_bias"])
        state["report_logit_scale"] = state.pop("logit_bias")
    elif "logit_bias" in state:
        config["loss"] = "siglip"
    if any(k.startswith("text.transformer.") for k in state):
        config["text"].update(_bert_shape_from_state(state))
    context = int(model_cfg["text_cfg"].get("context_length", config["text"].get("context_length", 256)))
    if context > int(config["text"]["max_positions"]):
        raise ValueError(f"released folder {folder}: context_length {context} exceeds the text tower's "
                         f"{config['text']['max_positions']} positions")
    config["text"]["context_length"] = context
    tokenizer = ReportTokenizer.load(text_folder if text_folder is not None else folder, context)
    if len(tokenizer) > int(config["text"]["vocab_size"]):
        raise ValueError(f"the tokenizer of {text_folder or folder} has {len(tokenizer)} tokens but the text tower "
                         f"only {config['text']['vocab_size']} embeddings")
    config["released"] = {"timm_model_name": name, "source": SOURCE, "hf_model_name": model_cfg["text_cfg"].get("hf_model_name"),
                          "preprocess_cfg": meta["preprocess_cfg"]}
    # the released inference pipeline (PreprocessSettings(preset="released")), at the model's grid
    config["preprocess"] = {"preset": "released", "target_shape": list(config["vision"]["img_size"])}
    # names and shapes checked on a meta-device skeleton first: a mismatch (say small weights under a
    # ViT-L name) is reported before a full-size model is allocated
    with torch.device("meta"):
        skeleton = HLIPModel(config, tokenizer=None)
    check_state(skeleton.state_dict(), state, f"{what} (configuration {name})", ignore=_IGNORED)
    del skeleton
    model = HLIPModel(config, tokenizer=None)
    model.tokenizer = tokenizer
    load_state_checked(model, state, what, ignore=_IGNORED)
    log.info("loaded released HLIP folder %s as %s", folder.name, name)
    return model.to(device).eval()
