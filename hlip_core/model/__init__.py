"""HLIP model: hierarchical study encoder, text tower, CLIP head, configurations, checkpoints."""
from .checkpoint import CheckpointMismatchError, load, load_official_checkpoint, read_config, save
from .clip import HLIPModel, autocast, cpu_has_native_bf16, create_model
from .encoder import HierarchicalViT
from .registry import get_config, list_configs
from .text import ReportTokenizer, TextTower, train_wordpiece

__all__ = [
    "CheckpointMismatchError", "HLIPModel", "HierarchicalViT", "ReportTokenizer", "TextTower", "autocast",
    "cpu_has_native_bf16", "create_model", "get_config", "list_configs", "load", "load_official_checkpoint",
    "read_config", "save", "train_wordpiece",
]
