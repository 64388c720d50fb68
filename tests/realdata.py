"""Where the real public test data lives.

The suite reads small excerpts that travel with the repository (``tests/data``, see its README for
provenance, licences and how they were made): every 8th slice of a real T1w brain MRI series and
the first rows of CT-RATE's validation label file. Nothing outside the repository is needed.

The full-size files (384 slices, 3,039 label rows) are an option for benchmarks only: set
``HLIP_SHARED_DATA`` to the folder holding ``mri-t1w-dicom/`` and ``ct-rate-labels/``.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"

MRI_EXCERPT_SLICES = 48  # every 8th of the series' 384 slices, ordered by position
MRI_FULL_SLICES = 384
CT_RATE_EXCERPT_ROWS = 300  # of 3,039


def _in_repo(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"the repository's test data is missing: {path.relative_to(DATA.parent.parent)} "
                    "(remake it with tools/make_test_excerpt.py)", pytrace=False)
    return path


def real_mri_dicom_dir() -> Path:
    """48 real DICOM slices (every 8th) of one oblique T1w brain MRI series (studyforrest, PDDL)."""
    return _in_repo(DATA / "mri-t1w-dicom" / "dicoms")


def ct_rate_labels_csv() -> Path:
    """The header and first 300 rows of CT-RATE's public validation label file (CC BY-NC-SA 4.0, tests only)."""
    return _in_repo(DATA / "ct-rate-labels" / "valid_labels.csv")


def full_size_mri_dicom_dir() -> Path | None:
    """The whole 384-slice series when ``HLIP_SHARED_DATA`` names a folder holding it, else None."""
    folder = os.environ.get("HLIP_SHARED_DATA")
    if not folder:
        return None
    path = Path(folder) / "mri-t1w-dicom" / "dicoms"
    if not path.is_dir():
        raise FileNotFoundError(f"HLIP_SHARED_DATA={folder} holds no mri-t1w-dicom/dicoms folder")
    return path


def benchmark_mri_dicom_dir() -> Path:
    """For benchmarks: the full-size series when ``HLIP_SHARED_DATA`` gives it, else the excerpt (said on stderr)."""
    import sys

    full = full_size_mri_dicom_dir()
    if full is not None:
        print(f"real MRI: the full {MRI_FULL_SLICES}-slice series from HLIP_SHARED_DATA", file=sys.stderr)
        return full
    print(f"real MRI: the repository's {MRI_EXCERPT_SLICES}-slice excerpt (set HLIP_SHARED_DATA for the full "
          f"{MRI_FULL_SLICES}-slice series)", file=sys.stderr)
    return real_mri_dicom_dir()
