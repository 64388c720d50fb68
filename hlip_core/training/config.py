"""The options of a training run: one dataclass, each field with its default and its help text.

The command line (``train/pretrain.py``) is generated from these fields, so the help printed by
``--help`` and the defaults used by the library are one and the same.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


TEXT_POOLINGS = ("cls", "mean", "sentence")  # hlip_core.model.text.POOLINGS (not imported: this module stays free of torch)
TEXT_FEATURE_NORMS = (None, "standardise", "whiten")  # hlip_core.model.text.FEATURE_NORMS
LOSSES = ("clip", "siglip", "dual")  # hlip_core.loss.LOSSES


def _opt(default, help: str, **extra):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    # -- data --
    data: str | None = _opt(None, "training manifest: a prepared folder or its manifest.jsonl (train/prepare.py writes it)")
    split: str | None = _opt(None, "use only the manifest's studies of this split (e.g. 'train'); all studies when not given")
    max_scans: int = _opt(4, "K: at most this many scans are sampled per study and step (without repetition)")
    report_prefix: str = _opt("This {modality} study shows: ",
                              "text put before the shuffled report sentences; {modality} becomes MRI, CT, ... of the study")
    workers: int = _opt(2, "data-loading worker processes per rank (0 = load in the training process)")
    # -- model --
    config: str = _opt("tiny_multiscan_h2", "model configuration name (see hlip_core.list_configs())")
    init_from: str | None = _opt(None, "start a new run from the weights of this model folder (a project model such as an "
                                       "earlier run's OUT/final, loaded with hlip_core.load): its configuration, tokenizer and "
                                       "weights, with --patch-dropout/--drop-path/--model-overrides applied; the optimiser, "
                                       "schedule and data order start afresh (--resume continues a run instead)")
    model_overrides: dict = _opt({}, "JSON merged into the model configuration, e.g. '{\"vision\": {\"drop_path\": 0.1}}'")
    loss: str | None = _opt(None, "'clip', 'siglip' or 'dual' (dual models: image token 0 against one random sentence of the "
                                  "report, the last image token against the whole report, each with its own temperature, "
                                  "the mean of the two CLIP losses); the configuration's choice when not given",
                            choices=(None, *LOSSES))
    text_model: str | None = _opt(None, "local Hugging Face folder of a pretrained text model (BiomedBERT...) with its tokenizer; "
                                        "when not given a small BERT and a WordPiece vocabulary trained on the reports are used")
    vocab_size: int = _opt(4000, "size of the WordPiece vocabulary trained on the reports (without --text-model)")
    text_pooling: str | None = _opt(None, "pooling of the text tower: 'cls' (the [CLS] token), 'mean' (mean of the tokens) or "
                                          "'sentence' (each sentence encoded alone, the report the mean of its sentences); "
                                          "the configuration's when not given", choices=(None, *TEXT_POOLINGS))
    text_pretrain_steps: int = _opt(0, "masked-language-model steps of the text tower on the training reports before the "
                                       "language-image training (a new run only; 0 = none): a small BERT from scratch learns far "
                                       "faster with them")
    text_pretrain_lr: float = _opt(1e-3, "peak learning rate of the text pre-training (--text-pretrain-steps)")
    text_pretrain_batch: int = _opt(64, "reports per step of the text pre-training (--text-pretrain-steps)")
    patch_dropout: float | None = _opt(None, "fraction of patch tokens dropped in training (the model configuration's "
                                             "vision.patch_dropout; prefix tokens are kept); the configuration's when not given. "
                                             "The released recipe: 0.5 for MRI, 0.25 for CT, then a second stage with "
                                             "--init-from FIRST_RUN/final --patch-dropout 0")
    drop_path: float | None = _opt(None, "stochastic depth rate of the image encoder; the configuration's when not given")
    lock_text: bool = _opt(False, "freeze the text transformer (its projection stays trainable)")
    lock_text_unlocked_layers: int = _opt(0, "with --lock-text: leave the last N transformer layers trainable")
    text_feature_norm: str | None = _opt(None, "with --lock-text: a fixed normalisation of the locked tower's pooled states before "
                                               "the projection, measured once on the training reports and saved with the model: "
                                               "'standardise' (each dimension) or 'whiten' (decorrelated too); none when not given",
                                         choices=(None, *TEXT_FEATURE_NORMS[1:]))
    grad_checkpointing: bool = _opt(False, "recompute activations in the backward pass (less memory, about 30%% more time)")
    # -- optimisation --
    steps: int = _opt(1000, "optimiser steps of the whole run")
    batch_size: int = _opt(8, "studies per micro-batch on each process")
    accum_steps: int = _opt(1, "micro-batches per step; the loss is exactly that of the whole "
                               "batch_size x accum_steps x processes batch (features are cached, as in open_clip)")
    lr: float = _opt(1e-4, "peak learning rate")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine decay")
    warmup_steps: int = _opt(100, "steps of linear warm-up from 0 to --lr")
    weight_decay: float = _opt(0.2, "AdamW weight decay (never on norms, biases, embeddings, cls token, logit scale/bias)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this value (0 = no clipping)")
    # -- machine --
    device: str = _opt("auto", "'auto' (a GPU when there is one), 'cpu' or 'cuda'")
    precision: str = _opt("auto", "'auto' (bf16 on a GPU, fp32 on the CPU), 'fp32', 'bf16' (autocast) or 'fp16' (GPU, grad scaler)",
                          choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = _opt(0, "random seed of weights, data order and augmentation")
    # -- output, checkpoints, evaluation --
    out: str = _opt("runs/hlip", "output folder: checkpoints/, final/ (the model), tensorboard/, train.log")
    checkpoint_every: int = _opt(500, "write a training checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = _opt(2, "keep the newest N training checkpoints")
    resume: str | None = _opt(None, "'auto' (newest complete checkpoint under OUT/checkpoints, if any) or a checkpoint folder")
    eval_data: str | None = _opt(None, "held-out manifest for zero-shot evaluation (studies with labels)")
    eval_prompts: str | None = _opt(None, "prompt set for --eval-data: a benchmark name or a JSON file (positive/negative prompt "
                                          "and label column per finding)")
    eval_every: int = _opt(500, "zero-shot evaluation every N steps (and at the end)")
    eval_batch_size: int = _opt(4, "studies per batch in evaluation")
    eval_max_scans: int = _opt(40, "at most this many scans of a held-out study are embedded (the first ones)")
    log_every: int = _opt(10, "TensorBoard scalars every N steps")
    progress: bool = _opt(True, "show a progress bar")
    tensorboard: bool = _opt(True, "write TensorBoard logs to OUT/tensorboard")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)

    def check(self) -> "TrainConfig":
        """Raise ValueError naming the first option with an impossible value."""
        positive = ("max_scans", "steps", "batch_size", "accum_steps", "checkpoint_every", "keep_checkpoints",
                    "eval_every", "eval_batch_size", "eval_max_scans", "log_every", "vocab_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "workers", "lock_text_unlocked_layers", "weight_decay", "grad_clip", "min_lr",
                     "text_pretrain_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.text_pretrain_steps and not (self.text_pretrain_lr > 0 and self.text_pretrain_batch >= 1):
            raise ValueError("--text-pretrain-lr must be positive and --text-pretrain-batch at least 1")
        if self.text_pooling is not None and self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"--text-pooling must be cls, mean or sentence, got {self.text_pooling!r}")
        for name in ("patch_dropout", "drop_path"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.loss is not None and self.loss not in LOSSES:
            raise ValueError(f"--loss must be clip, siglip or dual, got {self.loss!r}")
        if self.text_feature_norm not in TEXT_FEATURE_NORMS:
            raise ValueError(f"--text-feature-norm must be standardise or whiten, got {self.text_feature_norm!r}")
        if self.text_feature_norm and not self.lock_text:
            raise ValueError("--text-feature-norm needs --lock-text: the statistics are measured once and hold only for a fixed tower")
        if (self.eval_data is None) != (self.eval_prompts is None):
            raise ValueError("--eval-data and --eval-prompts go together: the held-out manifest and the prompts to score it with")
        if not self.data:
            raise ValueError("no training data: give --data MANIFEST (a folder prepared by train/prepare.py)")
        return self
