"""Public benchmarks: their label files as distributed, matched to a prepared manifest, scored zero-shot.

A benchmark is a prompt set (``prompts/<name>.json``: findings with their label column, prompt
wording, templates, the id column) plus the benchmark's own label CSV, read as it is distributed:

- one 0/1 column per finding (CT-RATE ``valid_labels.csv``, RSNA pivoted per study...); blank or
  ``nan`` cells are unknown and left out of that finding's metrics;
- several readers' columns ``R1:ICH, R2:ICH, R3:ICH`` (CQ500 ``reads.csv``): the majority read;
- multi-class sets (Pub-Brain-5): one 0/1 column per class, exactly one 1 per row.

Ids are compared without volume extensions (``valid_1_a_1.nii.gz`` -> ``valid_1_a_1``), to the
manifest's study ids or, when those do not match, its scan ids (each scan then embedded alone).
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .zeroshot import PromptSet

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz")


def bare_id(value: str) -> str:
    """An id without surrounding blanks or a volume file extension."""
    value = str(value).strip()
    for suffix in VOLUME_SUFFIXES:
        if value.lower().endswith(suffix):
            return value[: -len(suffix)]
    return value


@dataclass
class LabelTable:
    ids: list[str]
    names: list[str]  # finding (or class) names, in the prompt set's order
    labels: np.ndarray  # [n, F] float: 1, 0, or NaN (unknown)

    def subset(self, rows) -> "LabelTable":
        rows = list(rows)
        return LabelTable([self.ids[i] for i in rows], self.names, self.labels[rows])


def _cell(value: str, where: str) -> float:
    v = (value or "").strip().lower()
    if v in ("", "nan", "na", "n/a"):
        return math.nan
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a 0/1 label") from None
    if x not in (0.0, 1.0):
        raise ValueError(f"{where}: {value!r} is not a 0/1 label")
    return x


def read_labels(path: str | Path, prompt_set: PromptSet, id_column: str | None = None) -> LabelTable:
    """The label file of a benchmark: ids and [n, F] labels in the prompt set's finding order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no label file at {path}")
    id_column = id_column or prompt_set.id_column
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        rows = list(reader)
    if id_column is None:
        id_column = header[0] if header else None
    if id_column not in header:
        raise ValueError(f"{path.name}: no id column {id_column!r}; its columns are {', '.join(header)}")
    sources = {}
    for f in prompt_set.findings:
        column = f.column or f.name
        cols = [f"{r}:{column}" for r in prompt_set.readers] if prompt_set.readers else [column]
        missing = [c for c in cols if c not in header]
        if missing:
            raise ValueError(f"{path.name}: the {prompt_set.name} finding {f.name!r} needs column(s) {missing}; "
                             f"the file has {', '.join(header)}")
        sources[f.name] = cols
    ids, table, seen = [], [], set()
    for number, row in enumerate(rows, start=2):
        rid = bare_id(row[id_column])
        if not rid:
            raise ValueError(f"{path.name}:{number}: empty id")
        if rid in seen:
            raise ValueError(f"{path.name}:{number}: id {rid!r} appears twice")
        seen.add(rid)
        values = []
        for f in prompt_set.findings:
            reads = [_cell(row[c], f"{path.name}:{number} column {c!r}") for c in sources[f.name]]
            known = [r for r in reads if not math.isnan(r)]
            # a majority of the readers who read it; a tie is unknown
            values.append(math.nan if not known or 2 * sum(known) == len(known) else float(2 * sum(known) > len(known)))
        ids.append(rid)
        table.append(values)
    labels = np.array(table, dtype=float).reshape(len(ids), len(prompt_set.findings))
    if prompt_set.mode == "multiclass":
        bad = [ids[i] for i in range(len(ids)) if np.nansum(labels[i]) != 1]
        if bad:
            raise ValueError(f"{path.name}: multi-class rows need exactly one class marked 1; not so for {bad[:5]}")
    log.info("read %d labelled studies of %s from %s", len(ids), prompt_set.name, path.name)
    return LabelTable(ids, [f.name for f in prompt_set.findings], labels)


def match_unit(label_ids: list[str], study_ids: set[str], scan_ids: set[str]) -> str:
    """'study' when the label ids are study ids of the manifest, 'scan' when they are scan ids."""
    as_study = sum(i in study_ids for i in label_ids)
    as_scan = sum(i in scan_ids for i in label_ids)
    if not as_study and not as_scan:
        raise ValueError(f"none of the {len(label_ids)} label ids (e.g. {label_ids[:3]}) is a study or scan id of the "
                         f"manifest (e.g. {sorted(study_ids)[:3]}); prepare the benchmark's volumes with their ids")
    return "study" if as_study >= as_scan else "scan"


def align(labels: LabelTable, embedded_ids: list[str], allow_missing: bool = False) -> tuple[LabelTable, np.ndarray]:
    """Rows of ``labels`` that have an embedding, and their row numbers in ``embedded_ids``.
    Labelled ids without an embedding raise, unless ``allow_missing`` (then they are counted in the log)."""
    where = {sid: i for i, sid in enumerate(embedded_ids)}
    keep = [i for i, sid in enumerate(labels.ids) if sid in where]
    missing = len(labels.ids) - len(keep)
    if missing and not allow_missing:
        absent = [sid for sid in labels.ids if sid not in where]
        raise ValueError(f"{missing} labelled studies are not in the data (e.g. {absent[:5]}); prepare them, or pass "
                         "--allow-missing to evaluate on the others")
    if missing:
        log.warning("%d of %d labelled studies are not in the data; evaluating the other %d", missing, len(labels.ids), len(keep))
    sub = labels.subset(keep)
    return sub, np.array([where[sid] for sid in sub.ids], dtype=int)


def split_validation(ids: list[str], fraction: float, seed: int = 0, groups: list[str] | None = None) -> tuple[list[int], list[int]]:
    """A deterministic split of rows into (validation rows, test rows) by id, or by group when
    ``groups`` (one per row, e.g. the study of each scan) is given, so that no group is in both."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1, got {fraction}")
    groups = list(groups) if groups is not None else list(ids)
    if len(groups) != len(ids):
        raise ValueError(f"{len(groups)} groups for {len(ids)} rows")
    names = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(names))
    n_valid = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    if n_valid < 1:
        raise ValueError("a validation split needs at least two studies")
    valid_groups = {names[i] for i in order[:n_valid]}
    valid = [i for i, g in enumerate(groups) if g in valid_groups]
    test = [i for i, g in enumerate(groups) if g not in valid_groups]
    return valid, test
