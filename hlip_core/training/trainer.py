"""The training run: language-image pre-training on the studies of a manifest, one CPU to many GPUs.

    from hlip_core.training import TrainConfig, train
    result = train(TrainConfig(data="prepared/", out="runs/mine", steps=2000))
    result.model_path          # the final model: hlip_core.load(...) / StudyPredictor.load(...)

Under torchrun every process calls ``train`` with the same options; the process group, the data
shards and the gradient averaging are handled here (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..data.archive import _atomic_write, _peak_memory_mb
from ..data.manifest import read_settings
from ..loss import make_loss
from ..model import HLIPModel, autocast, create_model, save
from ..model.text import ReportTokenizer
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import Collate, StepSampler, StudyDataset, load_records, report_prefix, report_sentences, scan_shape, written_report
from .distributed import (DistEnv, all_gather_json, barrier, derive_seed, destroy_process_group, init_process_group,
                          mean_over_ranks, pick_device)
from .evaluate import format_auc_table, load_held_out, zero_shot_auc
from .optim import CosineSchedule, build_optimizer, clamp_logit_scale, lock_text_tower
from .step import DualObjective, MicroBatch, accumulate_gradients
from .text_pretrain import pretrain_text_tower
from .vocab import report_vocabulary, tokenizer_from_vocabulary

log = logging.getLogger(__name__)

FINAL = "final"


def _cache_locked_sentences(text) -> None:
    """A locked tower that encodes each sentence on its own gives a sentence the same states in every
    step: encode it once (exact; the text forward was 7% of the demo's step, benchmarks/demo_step.py).
    Towers that still train, apply dropout or pool otherwise are left as they are."""
    try:
        text.cache_sentences()
    except ValueError as why:
        log.info("text sentences are encoded in every step: %s", why)
    else:
        log.info("locked text tower: each sentence is encoded once and its states reused")


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient) stopped being a finite number; the run stopped before using it."""


@dataclass
class TrainResult:
    model_path: Path  # the final model folder (hlip_core.save format)
    checkpoint: Path | None  # the newest training checkpoint
    steps: int
    seconds: float
    loss: float  # the last step's loss
    evaluation: dict | None = None  # the last zero-shot result (see evaluate.zero_shot_auc)
    history: list[dict] = field(default_factory=list)  # every evaluation, with its step
    throughput: dict = field(default_factory=dict)  # median step time, studies/s, peak memory per process
    text_pretraining: dict | None = None  # the text tower's masked-language-model pre-training, when it ran


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: GPU memory allocated on a GPU, resident memory on the CPU
    (the ingestion's measure, which, unlike ru_maxrss, does not inherit the launching process's peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _peak_memory_mb()
    return float("nan") if peak is None else peak


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a GPU; on the CPU use bf16 or fp32")
    return precision


def amp_context(device: torch.device, precision: str):
    if precision == "fp16":
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return autocast(device, precision)


def train(config: TrainConfig, env: DistEnv | None = None) -> TrainResult:
    """Run (or resume) the training described by ``config``; see the module docstring."""
    config.check()
    env = env or DistEnv.from_env()
    device = pick_device(config.device, env)
    joined = env.distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized())
    init_process_group(env, device)
    try:
        return Trainer(config, env, device).run()
    finally:
        if joined:
            destroy_process_group()


class Trainer:
    """One process's share of a run. ``run()`` trains from the start or from a checkpoint."""

    def __init__(self, config: TrainConfig, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = config, env, device
        self.precision = resolve_precision(config.precision, device)
        self.out = Path(config.out)
        self.checkpoints = self.out / "checkpoints"
        records, root = load_records(config.data, config.split)
        self.shape = scan_shape(records)
        self.settings = read_settings(config.data)
        self.records = records
        self.dataset = StudyDataset(records, root, config.max_scans, config.report_prefix, config.seed)
        self.held = load_held_out(config.eval_data, config.eval_prompts) if config.eval_data else None
        self.history: list[dict] = []
        self.step_peak_mb: float | None = None
        self.text_pretraining: dict | None = None

    # -- setting up ---------------------------------------------------------------------------

    def _resume_folder(self) -> Path | None:
        if not self.cfg.resume:
            return None
        if self.cfg.resume == "auto":
            if self.env.is_main:
                ckpt.remove_partial(self.checkpoints)
            barrier(self.env)
            found = ckpt.latest_checkpoint(self.checkpoints)
            if found is None:
                log.info("--resume auto: no checkpoint under %s yet; starting from the beginning", self.checkpoints)
            return found
        folder = Path(self.cfg.resume)
        ckpt.read_checkpoint(folder)  # a clear error now if it is not a whole checkpoint
        return folder

    def _tokenizer(self) -> ReportTokenizer:
        """A WordPiece vocabulary of the reports (deterministic: every process builds the same)."""
        context = int(self.model_config_preview()["text"].get("context_length", 128))
        corpus = [written_report(self.cfg.report_prefix, r) for r in self.records]
        vocab = report_vocabulary(corpus, vocab_size=self.cfg.vocab_size)
        log.info("report vocabulary: %d tokens from %d reports", len(vocab), len(corpus))
        return tokenizer_from_vocabulary(vocab, context)

    def _pretrain_text(self, model: HLIPModel) -> dict:
        """Masked-language-model steps of the text tower on the training reports (text_pretrain.py)."""
        log.info("pre-training the text tower on %d training reports: %d masked-language-model steps",
                 len(self.records), self.cfg.text_pretrain_steps)
        def prefixes(records):
            return [report_prefix(self.cfg.report_prefix, r) for r in records]

        held = self.held.records if self.held is not None else []
        stats = pretrain_text_tower(
            model, [report_sentences(r) for r in self.records], prefixes(self.records),
            steps=self.cfg.text_pretrain_steps, batch_size=self.cfg.text_pretrain_batch, lr=self.cfg.text_pretrain_lr,
            seed=self.cfg.seed, device=self.device, log_every=max(1, self.cfg.text_pretrain_steps // 4),
            held_out=[report_sentences(r) for r in held] or None, held_out_prefixes=prefixes(held))
        line = f"text pre-training: masked-token loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f} in {stats['seconds']:.0f} s"
        if "held_out_after" in stats:
            line += f"; on the held-out reports {stats['held_out_before']:.3f} -> {stats['held_out_after']:.3f}"
        log.info("%s", line)
        return stats

    @torch.no_grad()
    def _fit_text_feature_norm(self, model: HLIPModel) -> None:
        """Measure the locked text tower's pooled states over the training reports (prefix and
        sentences in their written order) and set its feature normalisation from them."""
        texts = [written_report(self.cfg.report_prefix, r) for r in self.records]
        text = model.text
        was_training = text.training
        text.eval()
        try:
            pooled = torch.cat([text.pooled(*model.tokenize(texts[i:i + 64])).float() for i in range(0, len(texts), 64)])
        finally:
            text.train(was_training)
        text.fit_feature_norm(pooled)
        spread = pooled.std(dim=0)
        log.info("text features: %s over %d training reports (before: common part %.3g, the norm of the mean; "
                 "spread per dimension %.3g to %.3g)", "standardised" if text.feature_norm == "standardise" else "whitened",
                 len(texts), float(pooled.mean(dim=0).norm()), float(spread.min()), float(spread.max()))

    def model_overrides(self) -> dict:
        overrides = copy.deepcopy(self.cfg.model_overrides)
        vision = overrides.setdefault("vision", {})
        vision["img_size"] = list(self.shape)  # the model grid is the grid the arrays were prepared on
        if self.cfg.patch_dropout is not None:
            vision["patch_dropout"] = self.cfg.patch_dropout
        if self.cfg.drop_path is not None:
            vision["drop_path"] = self.cfg.drop_path
        if self.cfg.loss is not None:
            overrides["loss"] = self.cfg.loss
        if self.cfg.text_pooling is not None:
            overrides.setdefault("text", {})["pooling"] = self.cfg.text_pooling
        if self.cfg.text_feature_norm:
            overrides.setdefault("text", {})["feature_norm"] = self.cfg.text_feature_norm
        return overrides

    def model_config_preview(self) -> dict:
        from ..model import get_config

        return get_config(self.cfg.config, **self.model_overrides())

    def _initial_model(self) -> HLIPModel:
        """--init-from: the folder's model (a project checkpoint or a released Hugging Face folder) rebuilt with this run's overrides, then its weights (all
        of them, checked by name and shape: a clear error, never a partial load)."""
        from ..model import load
        from ..model.checkpoint import load_state_checked
        from ..model.registry import merge_config

        source = load(self.cfg.init_from)
        config = merge_config(copy.deepcopy(source.config), self.model_overrides())
        model = HLIPModel(config, tokenizer=None)
        model.tokenizer = source.tokenizer
        load_state_checked(model, source.state_dict(), f"--init-from {self.cfg.init_from}")
        log.info("new run initialised from the weights of %s (configuration %s)", self.cfg.init_from, config.get("name"))
        return model

    def _new_model(self) -> HLIPModel:
        overrides = self.model_overrides()
        if self.cfg.init_from:
            model = self._initial_model()
        elif self.cfg.text_model:
            torch.manual_seed(self.cfg.seed)
            model = create_model(self.cfg.config, text_folder=self.cfg.text_model, **overrides)
        else:
            tokenizer = self._tokenizer()
            torch.manual_seed(self.cfg.seed)
            model = create_model(self.cfg.config, tokenizer=tokenizer, **overrides)
        if self.settings is not None:
            # the ingestion settings travel with every checkpoint: inference prepares studies alike
            model.config["preprocess"] = self.settings
        else:
            log.warning("the manifest folder has no preprocess.json: checkpoints will not carry preprocessing settings")
        return model

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, env, device = self.cfg, self.env, self.device
        started = time.perf_counter()
        resume = self._resume_folder()
        doc = None
        if resume is not None:
            model, doc, opt_tensors, rng_tensors = ckpt.load_checkpoint(resume, device)
            log.info("resuming from %s (step %d)", resume, doc["step"])
        else:
            model = self._new_model().to(device)
            if cfg.text_pretrain_steps:
                # every process runs it (the same seed: no process waits on another past a collective's
                # timeout); DistributedDataParallel then starts them all from rank 0's weights
                self.text_pretraining = self._pretrain_text(model)
        model.train()
        self._check_scan_counts(model)
        dual = model.config.get("loss", "clip") == "dual"
        self.dataset.dual = dual  # each sample then carries one sentence and the whole report
        if cfg.lock_text:
            lock_text_tower(model, cfg.lock_text_unlocked_layers)
            _cache_locked_sentences(model.text)
            if cfg.text_feature_norm and resume is None:  # a resumed model has them in its checkpoint
                self._fit_text_feature_norm(model)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)

        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        schedule = CosineSchedule(cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr)
        scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        sampler_args = dict(num_studies=len(self.dataset), batch_size=cfg.batch_size, accum_steps=cfg.accum_steps,
                            rank=env.rank, world=env.world, seed=cfg.seed, total_steps=cfg.steps)
        start_step = 0
        if doc is not None:
            ckpt.load_optimizer_state(optimizer, doc["optimizer"], opt_tensors)
            schedule.load_state_dict(doc["scheduler"])
            if doc.get("scaler"):
                scaler.load_state_dict(doc["scaler"])
            start_step = int(doc["step"])
            self.history = list(doc.get("history", []))
            saved = doc["sampler"]
            now = StepSampler(**sampler_args).state_dict()
            if saved["global_batch"] != now["global_batch"] or saved["num_studies"] != now["num_studies"]:
                log.warning("the global batch or the manifest changed since the checkpoint (%s then, %s now): "
                            "the data order after the resume differs from an uninterrupted run", saved, now)
            mine = ckpt.rng_of_rank(doc, rng_tensors, env.rank)
            if mine is not None:
                ckpt.restore_rng(*mine)

        sampler = StepSampler(**sampler_args, start_step=start_step)
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=Collate(model.tokenizer),
                            num_workers=cfg.workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        objective = DualObjective(model) if dual else model
        ddp = None
        if env.distributed:
            ddp = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                          broadcast_buffers=False)
        net = ddp if ddp is not None else objective
        loss_fn = make_loss(model.config.get("loss", "clip"))
        trainable = [p for p in model.parameters() if p.requires_grad]

        if env.is_main:
            n_train = sum(p.numel() for p in trainable)
            log.info("%s: %.2fM trainable parameters; %d studies, %d steps of %d studies (%d process(es) x %d micro-batch(es) x %d); "
                     "%d steps per epoch; device %s, precision %s",
                     model.config["name"], n_train / 1e6, len(self.dataset), cfg.steps, sampler.global_batch, env.world,
                     cfg.accum_steps, cfg.batch_size, sampler.steps_per_epoch, device, self.precision)
        writer = self._writer(start_step) if env.is_main and cfg.tensorboard else None
        bar = self._progress_bar(start_step)
        last_checkpoint = ckpt.latest_checkpoint(self.checkpoints) if resume is not None else None
        loss_value, rate = float("nan"), None
        step_times: list[float] = []
        try:
            batches = iter(loader)
            for step in range(start_step, cfg.steps):
                tick = time.perf_counter()
                micro = [self._to_device(next(batches)) for _ in range(cfg.accum_steps)]
                lr = schedule.apply(optimizer, step)
                optimizer.zero_grad(set_to_none=True)
                losses = accumulate_gradients(
                    net, loss_fn, micro,
                    amp=lambda: amp_context(device, self.precision),
                    reseed=lambda k, s=step: torch.manual_seed(derive_seed(cfg.seed, env.rank, s, k)),
                    no_sync=ddp.no_sync if ddp is not None else None,
                    backward=lambda loss: scaler.scale(loss).backward(),
                )
                loss_value = float(mean_over_ranks(losses[-1], env))
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(self._diverged_message("the loss", loss_value, step, last_checkpoint))
                scaler.unscale_(optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
                if not math.isfinite(grad_norm) and not scaler.is_enabled():
                    raise TrainingDiverged(self._diverged_message("the gradient norm", grad_norm, step, last_checkpoint))
                scaler.step(optimizer)
                scaler.update()
                clamp_logit_scale(model)
                done = step + 1
                self.step_peak_mb = peak_memory_mb(device)  # before any checkpoint or evaluation of this step

                seconds = time.perf_counter() - tick
                step_times = (step_times + [seconds])[-1000:]
                now = sampler.global_batch / max(seconds, 1e-9)
                rate = now if rate is None else 0.9 * rate + 0.1 * now
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
                    bar.update(1)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    if writer is not None:
                        writer.add_scalar("train/loss", loss_value, done)
                        writer.add_scalar("train/lr", lr, done)
                        writer.add_scalar("train/samples_per_s", rate, done)
                        writer.add_scalar("train/grad_norm", grad_norm, done)
                        writer.add_scalar("train/logit_scale", float(model.logit_scale.detach().exp()), done)
                    if env.is_main:
                        log.log(logging.DEBUG if bar is not None else logging.INFO,
                                "step %d/%d loss %.4f lr %.2e %.1f studies/s", done, cfg.steps, loss_value, lr, rate)
                if self.held is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                    self._evaluate(model, done, writer)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    last_checkpoint = self._checkpoint(done, model, optimizer, schedule, scaler, sampler, loss_value)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()

        if start_step >= cfg.steps:
            log.info("the checkpoint is already at step %d of %d: nothing left to train", start_step, cfg.steps)
        final = self.out / FINAL
        if env.is_main:
            extra = {"steps": cfg.steps, "seed": cfg.seed, "training_config": cfg.config}
            if self.history:
                extra["zero_shot"] = self.history[-1]
            save(model, final, extra=extra)
        barrier(env)
        seconds = time.perf_counter() - started
        result = TrainResult(final, last_checkpoint or ckpt.latest_checkpoint(self.checkpoints), cfg.steps, seconds,
                             loss_value, self.history[-1] if self.history else None, list(self.history),
                             self._throughput(step_times, sampler.global_batch), self.text_pretraining)
        if env.is_main:
            _atomic_write(self.out / "summary.json", json.dumps(asdict(result), indent=2, default=str).encode("utf-8"))
            self._summary(result)
        # leave together: a gloo process whose peer has already torn its connections down can
        # abort in its own teardown ("terminate called without an active exception", seen once in
        # the 2-process test while rank 0 was still writing the summary)
        barrier(self.env)
        return result

    def _throughput(self, step_times: list[float], global_batch: int) -> dict:
        """Median step time (the first two steps, which warm up, left out when there are more),
        studies/s, and the peak memory of each process over its training steps (checkpoints and
        evaluations after the last step not included)."""
        times = step_times[2:] if len(step_times) > 4 else step_times
        median = float(np.median(times)) if times else float("nan")
        peak = self.step_peak_mb if self.step_peak_mb is not None else peak_memory_mb(self.device)
        peaks = all_gather_json(peak, self.env, self.device)
        return {"step_seconds": median, "studies_per_second": global_batch / median if times else float("nan"),
                "global_batch": global_batch, "processes": self.env.world, "peak_memory_mb": max(peaks),
                "peak_memory_mb_per_process": peaks, "device": str(self.device), "precision": self.precision}

    def _check_scan_counts(self, model: HLIPModel) -> None:
        """K must fit the model's scan-index table; single-scan models see one scan per study."""
        rows = int(model.config["vision"].get("max_scans", 40))
        if self.cfg.max_scans > rows:
            raise ValueError(f"--max-scans {self.cfg.max_scans} exceeds the {rows} scan positions of configuration "
                             f"{model.config['name']!r}; use --max-scans {rows} or less")
        self.eval_max_scans = self.cfg.eval_max_scans
        if rows == 1 and self.cfg.eval_max_scans > 1:
            log.info("%s takes one scan per study: held-out studies are evaluated on their first scan", model.config["name"])
            self.eval_max_scans = 1

    # -- pieces of a step ---------------------------------------------------------------------

    def _to_device(self, batch: dict) -> MicroBatch:
        d, pinned = self.device, self.device.type == "cuda"
        ids, attention = batch["tokens"]
        report = batch.get("report_tokens")
        return MicroBatch(batch["studies"].to(d, non_blocking=pinned), batch["scan_mask"].to(d),
                          (ids.to(d), attention.to(d)),
                          (report[0].to(d), report[1].to(d)) if report is not None else None)

    def _diverged_message(self, what: str, value: float, step: int, last: Path | None) -> str:
        where = (f"The last good checkpoint is {last}; "
                 "continue from it with --resume auto after lowering --lr or checking the data."
                 if last is not None else "No checkpoint had been written yet.")
        return f"{what} became {value} at step {step + 1}; training stopped before applying it. {where}"

    def _evaluate(self, model: HLIPModel, step: int, writer) -> dict:
        precision = "fp32" if self.precision == "fp16" else self.precision
        result = zero_shot_auc(model, self.held, self.device, precision, self.cfg.eval_batch_size, self.eval_max_scans, self.env)
        record = {"step": step, **result}
        self.history.append(record)
        if self.env.is_main:
            log.info("%s", format_auc_table(result, f"zero-shot on held-out studies at step {step}:"))
            if writer is not None:
                writer.add_scalar("eval/macro_auc", result["macro_auc"], step)
                for name, auc in result["auc"].items():
                    writer.add_scalar(f"eval/auc/{name}", auc, step)
                writer.flush()
        return result

    def _checkpoint(self, step: int, model, optimizer, schedule, scaler, sampler, loss: float) -> Path:
        meta, tensors = ckpt.capture_rng()
        meta["torch"] = {k: v.tolist() for k, v in tensors.items()}
        everyone = all_gather_json(meta, self.env, self.device)
        folder = self.checkpoints / ckpt.checkpoint_name(step)
        if self.env.is_main:
            rng_tensors = [{k: torch.tensor(v, dtype=torch.uint8) for k, v in m.pop("torch").items()} for m in everyone]
            state = {
                "scheduler": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "sampler": sampler.state_dict(),
                "world": self.env.world,
                "loss": loss,
                "history": self.history,
                "options": self.cfg.to_dict(),
            }
            folder = ckpt.save_checkpoint(self.checkpoints, step, model, optimizer, state, everyone, rng_tensors,
                                          keep=self.cfg.keep_checkpoints)
            log.debug("checkpoint written: %s", folder)
        barrier(self.env)
        return folder

    def _writer(self, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after the checkpoint it resumes from
        return SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=start_step if start_step else None)

    def _progress_bar(self, start_step: int):
        if not (self.cfg.progress and self.env.is_main):
            return None
        from tqdm import tqdm

        # redrawn a few times a second on a terminal; in a log file (no terminal) a line every 30 s
        interval = 0.2 if sys.stderr.isatty() else 30.0
        return tqdm(total=self.cfg.steps, initial=start_step, unit="step", dynamic_ncols=True, desc="training",
                    mininterval=interval, maxinterval=max(10.0, interval))

    def _summary(self, result: TrainResult) -> None:
        lines = [f"training finished: {result.steps} steps in {result.seconds / 60:.1f} min, last loss {result.loss:.4f}",
                 f"model: {result.model_path}  (hlip_core.load / hlip_core.inference.StudyPredictor.load)"]
        if result.checkpoint is not None:
            lines.append(f"last training checkpoint: {result.checkpoint}  (continue with --resume auto)")
        if result.evaluation is not None:
            lines.append(f"held-out zero-shot macro AUC: {result.evaluation['macro_auc']:.3f}")
        if self.cfg.tensorboard:
            lines.append(f"TensorBoard: tensorboard --logdir {self.out / 'tensorboard'}")
        log.info("\n".join(lines))
