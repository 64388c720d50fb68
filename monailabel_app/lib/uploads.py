"""What the server does with uploaded files beyond storing them: the expansion limits and
consistency checks of hlip_core.data.limits as HTTP errors, and the one temporary area.

- ``check_uploaded(path, max_voxels)``: 413 when a file would expand past ``--conf max_voxels``,
  422 when it contradicts its header (truncated, corrupt, NaN/inf voxels); the message names the
  limit and the figure.
- The temporary area is ``<cache_dir>/tmp`` (``tempfile.tempdir`` while the app runs: MONAI Label's
  own routes spool there too). ``clean_temporary`` empties it at start (partial files of a server
  killed mid-upload); ``TempSweepMiddleware`` empties it after a refused or failed upload
  (PUT/POST/PATCH answered >= 400) once no other upload is in flight, so a concurrent upload's
  files are never touched.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

from fastapi import HTTPException

from hlip_core.data.limits import VolumeInconsistent, VolumeTooLarge, check_dicom_file, check_volume_file, is_nifti

log = logging.getLogger(__name__)


def as_http(error: ValueError) -> HTTPException:
    """413 for VolumeTooLarge, 422 for VolumeInconsistent, with the check's own sentence."""
    return HTTPException(status_code=413 if isinstance(error, VolumeTooLarge) else 422, detail=str(error))


def check_uploaded(path: str, max_voxels: int, name: str) -> None:
    """Refuse (HTTPException 413/422) an uploaded NIfTI or DICOM file ``path`` (sent as ``name``)
    that would expand past ``max_voxels`` or contradicts its header. Other files pass."""
    what = f"uploaded file {name[:80]!r}"
    try:
        if is_nifti(path):
            check_volume_file(path, max_voxels, what)
        elif not path.lower().endswith((".nrrd", ".mha")):
            check_dicom_file(path, max_voxels, what)
    except (VolumeTooLarge, VolumeInconsistent) as e:
        raise as_http(e) from None


def clean_temporary(folder: Path) -> int:
    """Remove everything inside ``folder`` (created when missing); returns how many entries went."""
    folder.mkdir(parents=True, exist_ok=True)
    removed = 0
    for entry in os.scandir(folder):
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _temporary_folder() -> Path | None:
    from monailabel.interfaces.utils.app import apps

    for instance in list(apps.values()):
        config = getattr(instance, "hlip_config", None)
        if config is not None:
            return config.cache_dir / "tmp"
    return None


class TempSweepMiddleware:
    """Empties the temporary area after a refused or failed PUT/POST/PATCH, once no other such
    request is in flight (their files are theirs until they end). ``folder()`` gives the area."""

    def __init__(self, app, folder=None):
        self.app = app
        self.folder = folder or _temporary_folder
        self._lock = threading.Lock()
        self._in_flight = 0
        self._dirty = False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        status = 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with self._lock:
            self._in_flight += 1
        try:
            await self.app(scope, receive, sending)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._dirty = self._dirty or status >= 400
                if self._dirty and self._in_flight == 0:  # under the lock: no upload can start meanwhile
                    self._dirty = False
                    folder = self.folder()
                    removed = clean_temporary(folder) if folder is not None else 0
                    if removed:
                        log.info("removed %d temporary file(s) left by a refused or failed upload", removed)
