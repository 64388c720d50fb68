"""hlip_core: language-image pre-training on 3D medical studies (HLIP, Zhao et al., 2025).

Public API::

    model = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok)
    z = model.encode_study(studies, scan_mask)      # [B, N, 1, D, H, W] -> [B, E]
    t = model.encode_text(["no intracranial haemorrhage"])
    hlip_core.save(model, "ckpt/");  model = hlip_core.load("ckpt/")
    model = hlip_core.load_official_checkpoint("hlip.pt", "vit_base_multiscan_h2_token1176")

A released Hugging Face folder needs no name: ``hlip_core.load_official_checkpoint("hlip-2025-10-08/")``
or ``hlip_core.load(folder)``.

The model names are imported on first use, so ``import hlip_core.data`` (ingestion worker
processes, command-line tools) does not pay for importing torch.
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "CheckpointMismatchError": ".model", "HLIPModel": ".model", "create_model": ".model", "get_config": ".model",
    "list_configs": ".model", "load": ".model", "load_official_checkpoint": ".model", "save": ".model",
    "train_wordpiece": ".model", "StudyPredictor": ".inference",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hlip_core' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
