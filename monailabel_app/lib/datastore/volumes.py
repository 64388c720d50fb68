"""A DICOM series as one NIfTI volume for download (``GET /datastore/image``), read by the same
ingestion that feeds the model, so a heat map overlays the downloaded volume voxel for voxel."""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

from fastapi import HTTPException

from .catalog import signature_of

_lock = threading.Lock()  # one conversion at a time; a second request for the same series then finds it done


def series_volume(files: list[str], out: Path, what: str) -> str:
    """The path of ``out`` (a .nii.gz), written from the DICOM ``files`` when it is missing or the
    files changed since (a stamp beside it records their sizes and mtimes). Written atomically.
    ``what`` names the series in errors (422 when the ingestion finds no usable volume in it)."""
    stat = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    signature = signature_of(stat)
    stamp = out.with_name(out.name[: -len(".nii.gz")] + ".sig")
    with _lock:
        if out.is_file() and stamp.is_file() and stamp.read_text() == signature:
            return str(out)
        import SimpleITK as sitk
        from hlip_core.data import load_study

        loaded = load_study(list(files))
        if not loaded.scans:
            reasons = "; ".join(str(s) for s in loaded.skipped[:5]) or "no image files"
            raise HTTPException(status_code=422, detail=f"{what} is not a usable volume ({reasons})")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{uuid.uuid4().hex}.nii.gz")
        try:
            sitk.WriteImage(loaded.scans[0].image, str(tmp), True)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        tmp_stamp = stamp.with_name(f".{uuid.uuid4().hex}.sig")
        tmp_stamp.write_text(signature)
        os.replace(tmp_stamp, stamp)
        return str(out)
