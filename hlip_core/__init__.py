"""hlip_core: language-image pre-training on 3D medical studies (HLIP, Zhao et al., 2025).

Public API::

    model = hlip_core.create_model("tiny_multiscan_h2", tokenizer=tok)
    z = model.encode_study(studies, scan_mask)      # [B, N, 1, D, H, W] -> [B, E]
    t = model.encode_text(["no intracranial haemorrhage"])
    hlip_core.save(model, "ckpt/");  model = hlip_core.load("ckpt/")
    model = hlip_core.load_official_checkpoint("hlip.pt", "vit_base_multiscan_h2_token1176")
"""
from .model import (
    CheckpointMismatchError,
    HLIPModel,
    create_model,
    get_config,
    list_configs,
    load,
    load_official_checkpoint,
    save,
    train_wordpiece,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError", "HLIPModel", "create_model", "get_config", "list_configs", "load",
    "load_official_checkpoint", "save", "train_wordpiece",
]
