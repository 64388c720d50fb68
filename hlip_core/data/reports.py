"""Radiology reports and labels keyed by study: CSV, JSON or JSON Lines in, sentences out."""
from __future__ import annotations

import csv
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MATCH_FIELDS = ("study_id", "study_uid", "accession", "folder", "folder_name")


@dataclass
class ReportRow:
    report: str | None
    labels: dict = field(default_factory=dict)
    split: str | None = None


def _label(value):
    """A label cell: 0/1 for yes/no words and 0/1 numbers, a float for other numbers, None when empty."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() else float(value)
    text = str(value).strip().lower()
    if text in ("", "nan", "na", "n/a", "none", "null", "-"):
        return None
    if text in ("true", "yes", "y", "positive", "pos"):
        return 1
    if text in ("false", "no", "n", "negative", "neg"):
        return 0
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"label value {value!r} is neither a number nor yes/no") from None
    return int(number) if number.is_integer() else number


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, list):
            return data
        if isinstance(data, dict):
            # {key: "report text"} or {key: {...}}: the key becomes a column of its own
            rows = []
            for key, value in data.items():
                row = dict(value) if isinstance(value, dict) else {"report": value}
                row.setdefault("__key__", key)
                rows.append(row)
            return rows
    raise ValueError(f"reports file {path} must be .csv, .tsv, .json or .jsonl")


def read_reports(path: str | os.PathLike, key_column: str = "study_id", report_column: str | None = "report",
                 label_columns: list[str] | None = None, split_column: str | None = None) -> dict[str, ReportRow]:
    """Reports (and labels) by study key.

    path: a CSV/TSV (one row per study), a JSON list of objects, a JSON object {key: text or object}
        (its keys are the study keys), or JSON Lines.
    key_column: the column holding the study key (accession number, StudyInstanceUID, folder name...).
    report_column: the column holding the report text (None: labels only).
    label_columns: columns of 0/1 (or numeric) labels; empty cells are left out.
    Returns {key: ReportRow}. A missing column raises ValueError naming the columns there are.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no reports file at {path}")
    rows = _rows(path)
    out: dict[str, ReportRow] = {}
    if not rows:
        return out
    columns = set().union(*(r.keys() for r in rows))
    key_col = key_column if key_column in columns else ("__key__" if "__key__" in columns else None)
    needed = [c for c in [report_column, *(label_columns or []), split_column] if c]
    missing = [c for c in needed if c not in columns] + ([key_column] if key_col is None else [])
    if missing:
        shown = sorted(c for c in columns if c != "__key__")
        raise ValueError(f"reports file {path.name} has no column(s) {missing}; its columns are {shown[:30]}")
    duplicates = 0
    for number, row in enumerate(rows, start=1):
        key = row.get(key_col)
        if key is None or str(key).strip() == "":
            log.warning("reports file %s: row %d has no %s; ignored", path.name, number, key_column)
            continue
        key = str(key).strip()
        if key in out:
            duplicates += 1
            continue
        report = row.get(report_column) if report_column else None
        report = str(report).strip() if report not in (None, "") else None
        labels = {}
        for col in label_columns or []:
            try:
                value = _label(row.get(col))
            except ValueError as exc:
                raise ValueError(f"reports file {path.name}, row {number}, column {col!r}: {exc}") from None
            if value is not None:
                labels[col] = value
        split = str(row.get(split_column)).strip() if split_column and row.get(split_column) not in (None, "") else None
        out[key] = ReportRow(report, labels, split)
    if duplicates:
        log.warning("reports file %s: %d rows repeat a key already seen; the first row of each key is used", path.name, duplicates)
    return out


def match_report(table: dict[str, ReportRow], candidates: dict[str, str | None], match: str = "auto") -> tuple[ReportRow | None, str | None]:
    """The report of a study: ``candidates`` maps MATCH_FIELDS to the study's values; ``match`` is
    one of them or "auto" (the first that is in the table). Returns (row, field matched)."""
    if match != "auto" and match not in MATCH_FIELDS:
        raise ValueError(f"report_match must be 'auto' or one of {MATCH_FIELDS}, got {match!r}")
    fields = MATCH_FIELDS if match == "auto" else (match,)
    for name in fields:
        value = candidates.get(name)
        if value and value in table:
            return table[value], name
    return None, None


_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "vs", "e.g", "i.e", "etc", "approx", "fig", "no", "nos", "st", "cf", "al",
                  "resp", "incl", "max", "min", "prof", "ca", "mm", "cm", "ml"}
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d{1,2}[.)])\s+")
_BOUNDARY = re.compile(r"(?<=[.!?;])\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str | None) -> list[str]:
    """A report as a list of sentences: split at line breaks between items and after . ! ? or ;
    followed by a capital or a digit, but not after common abbreviations (e.g., Dr., vs.) or inside
    numbers (3.5 cm). Bullets and numbering are removed; empty pieces dropped."""
    if not text:
        return []
    out: list[str] = []
    for block in re.split(r"\n\s*\n|\r?\n(?=\s*(?:[-*\u2022]|\d{1,2}[.)])\s)|\r?\n(?=[A-Z][A-Za-z ]{1,30}:)", str(text)):
        block = _BULLET.sub("", " ".join(block.split()))
        if not block:
            continue
        start = 0
        for m in _BOUNDARY.finditer(block):
            head = block[start:m.start()]
            last = head.rsplit(" ", 1)[-1].rstrip(".!?;").lower()
            if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                continue  # "Dr. Who", "e.g. X", initials
            piece = head.strip()
            if piece:
                out.append(piece)
            start = m.end()
        piece = block[start:].strip()
        if piece:
            out.append(piece)
    return out
