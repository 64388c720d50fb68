"""The demo dataset on disk, made the way a user prepares their own archive.

    demo = build_demo("demo_output")
    demo.train, demo.test          # prepared folders (manifest.jsonl, preprocess.json, arrays/)
    demo.test_studies              # the held-out studies as NIfTI, one folder per study
    demo.prompts                   # the zero-shot prompt set of the demo findings

Layout of the folder::

    train/studies/<study>/<series>.nii.gz     one NIfTI file per scan, real geometry
    train/reports.csv                         study_id, report, one 0/1 column per finding
    train/prepared/                           hlip_core.data.prepare_archive of the two above
    test/...                                  the same for the held-out studies
    demo.json                                 what was built (a finished build is reused)

Every study is drawn from its own seed (split, index), so an interrupted build continues where it
stopped and gives the same studies.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .reports import write_report
from .synth import FINDINGS, Anatomy, draw_study, render_study

log = logging.getLogger(__name__)

# 2: lesion sites drawn uniformly from their region, float32 noise (faster generation);
# 3: reports end with an impression, haematomas of 15-21 mm radius (were 11-16)
VERSION = 3
GRID = (32, 64, 64)  # the tiny configurations' model grid
SPLITS = {"train": 0, "test": 1}


@dataclass
class DemoData:
    folder: Path
    train: Path  # prepared training folder
    test: Path  # prepared held-out folder
    train_studies: Path
    test_studies: Path  # held-out studies, NIfTI (what a server would be pointed at)
    test_reports: Path
    prompts: Path


def prompts_path() -> Path:
    """The demo's zero-shot prompt set (per finding, positive and negative phrasings, each side an ensemble)."""
    return Path(str(resources.files(__package__) / "prompts.json"))


def study_id(split: str, index: int) -> str:
    return f"demo-{split}-{index:04d}"


def _study_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _write_study(folder: Path, scans) -> None:
    import nibabel as nib

    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for scan in scans:
            image = nib.Nifti1Image(scan.data, scan.affine)
            image.header.set_xyzt_units("mm", "sec")
            image.header["descrip"] = scan.name.encode()[:79]
            nib.save(image, str(tmp / f"{scan.name}.nii.gz"))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _start_worker(anatomy: Anatomy) -> None:
    import torch

    # one thread per worker process: the processes share the cores, and many threads fighting over
    # few cores make element-wise torch code an order of magnitude slower
    torch.set_num_threads(1)
    _WORKER["anatomy"] = anatomy


_WORKER: dict = {}  # per worker process: the anatomy handed over once at start


def _make_study(task: tuple[str, str, int, int]) -> dict:
    """Draw study ``index`` of ``split`` and write its NIfTI folder unless complete; returns its CSV row."""
    studies, split, index, seed = task
    anatomy = _WORKER["anatomy"]
    rng = _study_rng(seed, split, index)
    spec = draw_study(anatomy, rng, study_id(split, index))
    report = write_report(spec, rng)
    target = Path(studies) / spec.study_id
    if not (target.is_dir() and len(list(target.glob("*.nii.gz"))) == len(spec.contrasts)):
        _write_study(target, render_study(anatomy, spec))
    return {"study_id": spec.study_id, "report": report, **spec.labels}


def generate_split(folder: Path, split: str, count: int, seed: int, anatomy: Anatomy, workers: int = 2,
                   progress: bool = True) -> Path:
    """NIfTI studies and reports.csv of one split under ``folder/split``; returns the reports file.
    Studies already on disk (complete folders) are not drawn again."""
    import multiprocessing as mp

    studies = folder / split / "studies"
    studies.mkdir(parents=True, exist_ok=True)
    tasks = [(str(studies), split, i, seed) for i in range(count)]
    with mp.get_context("spawn").Pool(max(1, workers), initializer=_start_worker, initargs=(anatomy,)) as pool:
        results = pool.imap(_make_study, tasks, chunksize=4)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=count, desc=f"demo {split} studies", unit="study")
        rows = list(results)
    reports = folder / split / "reports.csv"
    tmp = reports.with_name(f".{reports.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["study_id", "report", *FINDINGS])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, reports)
    return reports


def build_demo(folder: str | os.PathLike = "demo_output", train_studies: int = 1500, test_studies: int = 120,
               seed: int = 0, workers: int = 2, progress: bool = True) -> DemoData:
    """Generate (or find) the demo studies and prepare them with ``hlip_core.data.prepare_archive``."""
    from ..data import prepare_archive
    from ..data.preprocess import PreprocessSettings

    folder = Path(folder)
    wanted = {"version": VERSION, "train_studies": int(train_studies), "test_studies": int(test_studies), "seed": int(seed),
              "grid": list(GRID)}
    record = folder / "demo.json"
    data = DemoData(folder, folder / "train" / "prepared", folder / "test" / "prepared", folder / "train" / "studies",
                    folder / "test" / "studies", folder / "test" / "reports.csv", prompts_path())
    if record.is_file() and json.loads(record.read_text()) == wanted:
        log.info("demo studies found in %s", folder)
        return data
    if record.is_file():
        log.info("the demo in %s was built with other settings; building it again", folder)
        for split in SPLITS:
            shutil.rmtree(folder / split, ignore_errors=True)
        record.unlink()
    log.info("building the demo dataset in %s: %d training and %d held-out brain MRI studies", folder, train_studies, test_studies)
    anatomy = Anatomy.load()
    settings = PreprocessSettings(target_shape=GRID)
    for split, count in (("train", train_studies), ("test", test_studies)):
        reports = generate_split(folder, split, count, seed, anatomy, workers, progress)
        prepared = folder / split / "prepared"
        summary = prepare_archive(folder / split / "studies", prepared, settings, reports=reports, report_key="study_id",
                                  report_column="report", label_columns=list(FINDINGS), workers=workers, progress=progress)
        log.info("prepared the %s studies: %s", split, summary)
    record.write_text(json.dumps(wanted))
    return data
