"""Where the real public test data lives (see the data's own README).

The data sits beside the repository in ``../shared/data`` on the project's machines; set
``HLIP_SHARED_DATA`` to its folder elsewhere. A test that needs it fails with this explanation
when it is missing: it is never skipped silently.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_data() -> Path:
    folder = Path(os.environ.get("HLIP_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (folder / "mri-t1w-dicom" / "dicoms").is_dir():
        pytest.fail(f"the real test data is not at {folder}; set HLIP_SHARED_DATA to the folder holding "
                    "mri-t1w-dicom/ and ct-rate-labels/", pytrace=False)
    return folder


def real_mri_dicom_dir() -> Path:
    """384 real DICOM slices of one oblique T1w brain MRI series (studyforrest, PDDL)."""
    return shared_data() / "mri-t1w-dicom" / "dicoms"


def ct_rate_labels_csv() -> Path:
    """CT-RATE's public validation label file, as distributed (CC BY-NC-SA 4.0, tests only)."""
    return shared_data() / "ct-rate-labels" / "valid_labels.csv"
