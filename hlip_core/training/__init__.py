"""Training: language-image pre-training of HLIP models on prepared studies (see ``trainer``).

    from hlip_core.training import TrainConfig, train
    result = train(TrainConfig(data="prepared/", out="runs/mine"))
"""
from .config import TrainConfig
from .data import Collate, StepSampler, StudyDataset, load_records
from .distributed import DistEnv
from .evaluate import format_auc_table, load_held_out, zero_shot_auc
from .optim import CosineSchedule, build_optimizer, lock_text_tower, param_groups
from .step import DualObjective, MicroBatch, accumulate_gradients
from .trainer import TrainingDiverged, TrainResult, train

__all__ = [
    "Collate", "CosineSchedule", "DistEnv", "DualObjective", "MicroBatch", "StepSampler", "StudyDataset", "TrainConfig", "TrainResult",
    "TrainingDiverged", "accumulate_gradients", "build_optimizer", "format_auc_table", "load_held_out", "load_records",
    "lock_text_tower", "param_groups", "train", "zero_shot_auc",
]
