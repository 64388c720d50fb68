"""Studies of a manifest as training samples, and the order in which each process sees them.

Every random choice about a sample (which scans, in which order; the order of the report's
sentences) is drawn from a generator seeded by (seed, epoch, study index), never from a running
random state: the same step gets the same samples whatever the number of loader workers, after a
resume, and on whichever rank it lands.
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data.manifest import load_scan, manifest_path, read_manifest, stack_scans
from ..eval.embedding import collate as pad_studies

log = logging.getLogger(__name__)

MODALITY_WORDS = {"MR": "MRI", "MRI": "MRI", "CT": "CT", "PT": "PET", "PET": "PET", "NM": "nuclear medicine", "US": "ultrasound"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class NoUsableStudyError(RuntimeError):
    """Every study tried in a row failed to load; the message names the last reason."""


def split_sentences(report: str) -> list[str]:
    """A report's sentences (split after '.', '!' or '?'), without empty ones."""
    return [s.strip() for s in _SENTENCE_END.split(report or "") if s.strip()]


def report_sentences(record: dict) -> list[str]:
    """The sentences of a manifest record, from 'sentences' or else from the 'report' text."""
    sentences = [s.strip() for s in record.get("sentences") or [] if s and s.strip()]
    return sentences or split_sentences(record.get("report") or "")


def study_modality(record: dict) -> str:
    """The study's most frequent scan modality in words (MRI, CT, ...)."""
    counts = Counter(str(s.get("modality", "")).upper() for s in record["scans"])
    code = counts.most_common(1)[0][0] if counts else ""
    return MODALITY_WORDS.get(code, code or "imaging")


def report_prefix(prefix: str, record: dict) -> str:
    """The text put before a study's report sentences: ``prefix`` with {modality} filled in."""
    return prefix.replace("{modality}", study_modality(record))


def written_report(prefix: str, record: dict) -> str:
    """A study's report after its prefix, sentences in their written order (training shuffles them)."""
    return report_prefix(prefix, record) + " ".join(report_sentences(record))


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), 0x5A3D1E, int(epoch), int(index)])


def load_records(path: str | os.PathLike, split: str | None = None, need_text: bool = True) -> tuple[list[dict], Path]:
    """Studies of a manifest (optionally one split), and the folder their paths are relative to.

    need_text: leave out (and count in the log) studies without report text.
    """
    records = read_manifest(path)
    root = manifest_path(path).parent
    if split is not None:
        records = [r for r in records if r.get("split") == split]
        if not records:
            raise ValueError(f"manifest {manifest_path(path)} has no study of split {split!r}")
    if need_text:
        without = [r for r in records if not report_sentences(r)]
        if without:
            log.warning("%d of %d studies have no report text and are left out of training", len(without), len(records))
            records = [r for r in records if report_sentences(r)]
    if not records:
        raise ValueError(f"manifest {manifest_path(path)} has no study with report text to train on")
    return records, root


def scan_shape(records: Sequence[dict]) -> tuple[int, int, int]:
    """The one model-grid shape [D, H, W] shared by every scan of the manifest (ValueError otherwise)."""
    shapes = Counter(tuple(int(v) for v in s["shape"]) for r in records for s in r["scans"])
    if len(shapes) != 1:
        listed = ", ".join(f"{list(k)} x{v}" for k, v in shapes.most_common(5))
        raise ValueError(f"the manifest's scans have {len(shapes)} different shapes ({listed}); "
                         "studies are batched, so prepare every scan on one grid")
    shape = next(iter(shapes))
    if len(shape) != 3:
        raise ValueError(f"scans must be [D, H, W] volumes, the manifest says {list(shape)}")
    return shape  # type: ignore[return-value]


@dataclass
class Sample:
    study_id: str
    scans: torch.Tensor  # [n, 1, D, H, W]: uint8 in [0, 255] (uint8 storage) or float32 in [0, 1]
    text: str  # the shuffled report (dual training: one sentence of it), after the prefix
    report: str | None = None  # dual training: the whole shuffled report, after the prefix


class StudyDataset(Dataset):
    """Training samples of a manifest. ``dataset[(epoch, index)]`` -> Sample.

    Up to ``max_scans`` distinct scans are drawn per study, in random order; the report's sentences
    are shuffled and joined after ``prefix`` ({modality} is replaced by the study's modality).
    dual: each sample also carries the whole report (``Sample.report``) and its ``text`` is ONE
    sentence of the report drawn at random per epoch, after the same prefix (the dual models' recipe).
    A study that fails to load is logged and replaced by the next study of the manifest, so a batch
    keeps its size (every process of a distributed run must contribute the same number of studies).
    """

    def __init__(self, records: Sequence[dict], root: str | os.PathLike, max_scans: int, prefix: str = "", seed: int = 0,
                 dual: bool = False):
        if max_scans < 1:
            raise ValueError(f"max_scans must be at least 1, got {max_scans}")
        self.records = list(records)
        self.root = Path(root)
        self.max_scans = int(max_scans)
        self.prefix = prefix
        self.seed = int(seed)
        self.dual = bool(dual)
        self._failed: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def text(self, record: dict, rng: np.random.Generator) -> str:
        sentences = report_sentences(record)
        order = rng.permutation(len(sentences))
        body = " ".join(sentences[i] for i in order)
        return report_prefix(self.prefix, record) + body

    def load(self, index: int, epoch: int) -> Sample:
        """Sample of study ``index`` for ``epoch``; raises whatever reading its arrays raises."""
        record = self.records[index]
        rng = sample_rng(self.seed, epoch, index)
        scans = record["scans"]
        chosen = rng.permutation(len(scans))[: self.max_scans]
        text = self.text(record, rng)
        report = None
        if self.dual:
            sentences = report_sentences(record)
            report, text = text, report_prefix(self.prefix, record) + sentences[int(rng.integers(len(sentences)))]
        arrays = [load_scan(self.root, scans[i], mmap=False, as_float=False) for i in chosen]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"scans of different shapes {[list(a.shape) for a in arrays]}")
        volume = stack_scans(arrays)
        if volume.dtype != np.uint8 and not np.isfinite(volume).all():
            raise ValueError("a scan holds NaN or infinite values")
        return Sample(record["study_id"], torch.from_numpy(volume)[:, None], text, report)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        last_error = None
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            if i in self._failed:
                continue
            try:
                return self.load(i, epoch)
            except Exception as exc:  # noqa: BLE001 - one bad study must never stop a run
                self._failed.add(i)
                last_error = exc
                log.warning("study %s skipped: %s: %s", self.records[i]["study_id"], type(exc).__name__, exc)
        raise NoUsableStudyError(f"no study of the manifest could be loaded; the last error: {last_error}")


class Collate:
    """Pads samples into a batch: studies [B, N, 1, D, H, W], scan_mask [B, N] bool, tokens, ids.
    Dual samples (with a ``report``) add ``report_tokens``: every sample of a batch must have one then.
    Studies stay uint8 when every sample is (the model reads uint8 as x / 255), else float32."""

    def __init__(self, tokenize: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]):
        self.tokenize = tokenize

    def __call__(self, samples: list[Sample]) -> dict:
        studies, mask = pad_studies([s.scans for s in samples])
        ids, attention = self.tokenize([s.text for s in samples])
        batch = {"studies": studies, "scan_mask": mask, "tokens": (ids, attention), "study_ids": [s.study_id for s in samples]}
        reports = [s.report for s in samples]
        if any(r is not None for r in reports):
            if any(r is None for r in reports):
                raise ValueError("a batch mixes samples with and without a whole report (dual training needs both texts)")
            batch["report_tokens"] = self.tokenize(reports)
        return batch


class StepSampler(Sampler):
    """Micro-batches of (epoch, index) pairs for one process, step after step.

    Each epoch is a permutation of the studies seeded by (seed, epoch). Step s takes the next
    ``global_batch = world x accum_steps x batch_size`` studies of it (an incomplete tail is
    dropped); process r gets the r-th share, as ``accum_steps`` micro-batches of ``batch_size``.
    Iteration runs from ``start_step`` up to ``total_steps``, so a resumed run continues exactly.
    """

    def __init__(self, num_studies: int, batch_size: int, accum_steps: int, rank: int, world: int, seed: int,
                 total_steps: int, start_step: int = 0):
        self.num_studies = int(num_studies)
        self.batch_size = int(batch_size)
        self.accum_steps = int(accum_steps)
        self.rank, self.world = int(rank), int(world)
        self.seed = int(seed)
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        if self.global_batch > self.num_studies:
            raise ValueError(
                f"a step needs {self.global_batch} studies ({self.world} process(es) x {self.accum_steps} micro-batch(es) x "
                f"{self.batch_size}) but the manifest has {self.num_studies}; lower --batch-size or --accum-steps"
            )

    @property
    def global_batch(self) -> int:
        return self.world * self.accum_steps * self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_studies // self.global_batch

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 0xE9, int(epoch)]).permutation(self.num_studies)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, first index into that epoch's permutation) of ``step``."""
        return divmod(int(step), self.steps_per_epoch)[0], (int(step) % self.steps_per_epoch) * self.global_batch

    def step_indices(self, step: int, permutation: np.ndarray | None = None) -> list[list[tuple[int, int]]]:
        """This process's micro-batches of ``step`` (``permutation``: that epoch's, if at hand)."""
        epoch, offset = self.position(step)
        perm = self.permutation(epoch) if permutation is None else permutation
        share = self.accum_steps * self.batch_size
        start = offset + self.rank * share
        mine = perm[start : start + share]
        return [[(epoch, int(i)) for i in mine[k * self.batch_size : (k + 1) * self.batch_size]] for k in range(self.accum_steps)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, perm = None, None
        for step in range(self.start_step, self.total_steps):
            if self.position(step)[0] != epoch:
                epoch = self.position(step)[0]
                perm = self.permutation(epoch)
            yield from self.step_indices(step, perm)

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accum_steps

    def state_dict(self) -> dict:
        return {"seed": self.seed, "global_batch": self.global_batch, "num_studies": self.num_studies,
                "steps_per_epoch": self.steps_per_epoch}
