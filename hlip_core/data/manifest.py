"""The manifest of a prepared archive: the contract between ingestion, training and evaluation.

A prepared archive is a folder::

    OUT/manifest.jsonl        one study a line (below), written by the ingestion
    OUT/preprocess.json       the PreprocessSettings the arrays were made with (they travel into
                              every checkpoint trained on them, so inference preprocesses alike)
    OUT/skipped.jsonl         every file and series that was not used, with its reason
    OUT/arrays/...            one .npy file per scan on the model grid, [D, H, W], uint8 or float16

A manifest line (JSON object)::

    {"study_id": "s0001",                       # the user's choice: UID, hash or folder name
     "scans": [{"scan_id": "1.2.3...",          # SeriesInstanceUID (or file stem for NIfTI)
                "path": "arrays/s0001/1.2.3.npy",  # relative to the manifest's folder
                "shape": [32, 64, 64], "dtype": "uint8",
                "modality": "MR", "description": "T1 axial",
                ...}],                          # more facts (geometry, sequence hints) may follow
     "report": "full report text" | null,
     "sentences": ["sentence one.", ...],        # the report split into sentences
     "labels": {"finding": 0 or 1, ...},         # optional
     "split": "train" | "valid" | "test"}        # optional

Arrays store intensities already normalised to [0, 1]: uint8 as 0..255, float16 as is.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SETTINGS = "preprocess.json"
SKIPPED = "skipped.jsonl"
SCAN_KEYS = ("scan_id", "path", "shape", "dtype", "modality")
DTYPES = ("uint8", "float16")


class ManifestError(ValueError):
    """A manifest line that cannot be used; the message names the file and the line."""


def manifest_path(path: str | os.PathLike) -> Path:
    """A manifest file from its own path or from the prepared folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path} (prepare an archive first: train/prepare.py)")
    return path


def check_record(record: dict, where: str = "record") -> dict:
    """Raise ManifestError unless ``record`` has the keys training and evaluation rely on."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("study_id"), str) or not record["study_id"]:
        raise ManifestError(f"{where}: 'study_id' missing or empty")
    scans = record.get("scans")
    if not isinstance(scans, list) or not scans:
        raise ManifestError(f"{where}: study {record['study_id']!r} lists no scans")
    for i, scan in enumerate(scans):
        missing = [k for k in SCAN_KEYS if k not in scan]
        if missing:
            raise ManifestError(f"{where}: scan {i} of study {record['study_id']!r} lacks {missing}")
        if scan["dtype"] not in DTYPES:
            raise ManifestError(f"{where}: scan {i} of study {record['study_id']!r} has dtype {scan['dtype']!r}; expected one of {DTYPES}")
    sentences = record.get("sentences", [])
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise ManifestError(f"{where}: 'sentences' of study {record['study_id']!r} must be a list of strings")
    return record


def iter_manifest(path: str | os.PathLike) -> Iterator[dict]:
    """Study records of a manifest, in file order, each checked. A truncated last line (a writer
    killed mid-line) is reported and skipped; any other bad line raises ManifestError."""
    path = manifest_path(path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not line.endswith("\n"):
                log.warning("%s: last line %d is incomplete (an interrupted write); it is ignored", path, number)
                return
            raise ManifestError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        yield check_record(record, f"{path}:{number}")


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """All study records of a manifest file (or of the prepared folder holding ``manifest.jsonl``)."""
    records = list(iter_manifest(path))
    seen: set[str] = set()
    for r in records:
        if r["study_id"] in seen:
            raise ManifestError(f"{manifest_path(path)}: study {r['study_id']!r} appears twice")
        seen.add(r["study_id"])
    return records


def read_settings(path: str | os.PathLike) -> dict | None:
    """The preprocessing settings (a PreprocessSettings dict) stored beside a manifest, or None."""
    folder = manifest_path(path).parent
    settings = folder / SETTINGS
    return json.loads(settings.read_text()) if settings.is_file() else None


def load_scan(root: str | os.PathLike, scan: dict, mmap: bool = True, as_float: bool = True) -> np.ndarray:
    """The model-grid array of one manifest scan as float32 [D, H, W] in [0, 1].

    root: the manifest's folder (scan paths are relative to it).
    as_float: False keeps uint8 storage as uint8 [0, 255] (the model reads it as x / 255), a
    quarter of the memory to copy into batches; other storage comes as float32 either way.
    """
    path = Path(root) / scan["path"]
    if not path.is_file():
        raise FileNotFoundError(f"scan {scan['scan_id']!r}: array file {scan['path']} is missing under {root}")
    array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    if list(array.shape) != list(scan["shape"]):
        raise ManifestError(f"scan {scan['scan_id']!r}: {scan['path']} holds {list(array.shape)}, the manifest says {scan['shape']}")
    if array.dtype == np.uint8:
        return np.array(array) if not as_float else array.astype(np.float32) / 255.0
    return np.asarray(array, dtype=np.float32)


def stack_scans(arrays: list[np.ndarray]) -> np.ndarray:
    """Scans of one study from ``load_scan(..., as_float=False)`` as one array [n, D, H, W]: uint8
    when every scan is uint8 storage (the model reads it as x / 255), else float32 in [0, 1] (uint8
    scans among them read as x / 255)."""
    if any(a.dtype != np.uint8 for a in arrays):
        arrays = [a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a for a in arrays]
    return np.stack(arrays)
