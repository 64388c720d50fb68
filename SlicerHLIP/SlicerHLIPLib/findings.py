"""Findings as the user types them, the default lists per body region (data in
``Resources/DefaultFindings.json``), and the rows of the findings table."""
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
    modality: str  # "CT" or "MR": what volumes of this region are, when the scene does not say
    findings: list


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
