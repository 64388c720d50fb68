"""Findings as the user types them, the default lists per body region (data in
``Resources/DefaultFindings.json``) and the connected server's, and the rows of the findings table."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MAX_FINDING_CHARS = 300  # the server's limit per finding
DEFAULT_FINDINGS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "DefaultFindings.json"


@dataclass
class Region:
    name: str  # "Head CT", "Brain MRI", "Chest CT"
    modality: str  # "CT" or "MR": what volumes of this region are, when the scene does not say ("": not said)
    findings: list
    from_server: bool = False  # the connected server's default findings, not a body region of the module


def load_regions(path=DEFAULT_FINDINGS_FILE) -> list:
    """The body regions and their default findings, in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return [Region(str(r["name"]), str(r["modality"]), [str(f) for f in r["findings"]]) for r in data["regions"]]


def region_named(name: str, regions: Optional[list] = None) -> Region:
    regions = load_regions() if regions is None else regions
    for region in regions:
        if region.name.lower() == (name or "").strip().lower():
            return region
    raise KeyError(f"no default findings for {name!r}; regions: {', '.join(r.name for r in regions)}")


SERVER_DEFAULTS = "Server defaults"


def with_server_defaults(regions: list, findings: list, name: str = SERVER_DEFAULTS) -> list:
    """The default lists the panel offers: the body regions, then, when the connected server names
    default findings, the server's under ``name`` (a previous server's list is replaced, and
    dropped when this server names none). The server's list says no modality: volumes asked with
    it are sent without one, and the server's own default applies."""
    out = [r for r in regions if not r.from_server]
    if findings:
        out.append(Region(name, "", [str(f) for f in findings], from_server=True))
    return out


def findings_preview(findings: list, limit: int = 8) -> tuple:
    """(the first ``limit`` findings, how many are left out): a one-line summary of a long list."""
    findings = list(findings or [])
    limit = max(0, int(limit))
    return findings[:limit], max(0, len(findings) - limit)


def findings_text(findings: list) -> str:
    """The text box's content for a list of findings: one a line."""
    return "\n".join(findings)


def parse_findings_text(text: str, max_findings: Optional[int] = None) -> list:
    """Findings typed one per line -> list of findings. Blank lines and lines starting with '#'
    are ignored, spaces collapsed, repeats dropped (first kept). Raises ValueError in words."""
    out, seen = [], set()
    for number, line in enumerate((text or "").splitlines(), start=1):
        finding = " ".join(line.split())
        if not finding or finding.startswith("#"):
            continue
        if len(finding) > MAX_FINDING_CHARS:
            raise ValueError(f"Line {number} is {len(finding)} characters long; keep each finding under {MAX_FINDING_CHARS}.")
        key = finding.lower()
        if key not in seen:
            seen.add(key)
            out.append(finding)
    if not out:
        raise ValueError("Type at least one finding, one per line (e.g. 'intracranial haemorrhage'), "
                         "or start from a region's default list.")
    if max_findings and len(out) > max_findings:
        raise ValueError(f"{len(out)} findings typed; the server answers at most {max_findings} at a time.")
    return out


# The findings table: (column name, value type as Slicer's table node names it)
TABLE_COLUMNS = [("Finding", "string"), ("Probability", "double"), ("Score", "double"), ("Scan", "string"), ("Flag", "string")]
FLAG_ABOVE = "above threshold"


def table_rows(result, scan_names: Optional[dict] = None, threshold: float = 0.5) -> list:
    """One dict per finding (in the question's order) with the TABLE_COLUMNS keys.

    ``result``: a FindingsResult; ``scan_names``: image id (or uploaded file name) -> the name the
    user knows the scan by (a Slicer node's name); ``threshold``: probabilities at or above it
    are flagged."""
    scan_names = scan_names or {}
    rows = []
    for row in result.rows:
        scan = scan_names.get(row.image_id) or row.scan_description or row.scan_id or ""
        rows.append({"Finding": row.finding, "Probability": round(row.probability, 4), "Score": round(row.score, 4),
                     "Scan": scan, "Flag": FLAG_ABOVE if row.probability >= threshold else ""})
    return rows


def table_sort_keys(row: dict) -> list:
    """One sort key per TABLE_COLUMNS column of a ``table_rows`` row: a number for the numeric
    columns, case-folded text for the others. Slicer's table view compares its cells as text,
    which puts a score of "-0.05" before "-0.1"; these keys sort by value."""
    return [float(row[name]) if kind == "double" else str(row[name]).casefold() for name, kind in TABLE_COLUMNS]


def is_flagged(row: dict) -> bool:
    """Whether a ``table_rows`` row is at or above the flag threshold (highlighted in the panel)."""
    return row.get("Flag") == FLAG_ABOVE


# Rows of Slicer's table model (qMRMLTableModel) and rows of the table node. Unless the node uses
# its column titles as the column header (vtkMRMLTableNode::SetUseColumnTitleAsColumnHeader), the
# model shows the column names as an extra first row, and model row r is table row r - 1.


def table_row_of_model_row(model_row: int, titles_in_header: bool, row_count: int) -> Optional[int]:
    """The table node's row shown in row ``model_row`` of the table model (a view's row is first
    mapped through the view's sort proxy to the model's), or None for the header row and rows
    past the table's ``row_count``."""
    row = int(model_row) - (0 if titles_in_header else 1)
    return row if 0 <= row < row_count else None


def model_row_of_table_row(table_row: int, titles_in_header: bool) -> int:
    """The table model's row that shows row ``table_row`` of the table node."""
    return int(table_row) + (0 if titles_in_header else 1)
