"""Upload sessions (MONAI Label's ``PUT /session/``) that also keep what the upload said about its
files: the modality of each volume file, which a NIfTI/NRRD/MHA file does not carry itself.

Sessions expire after MONAI Label's ``MONAI_LABEL_SESSION_EXPIRY`` (3600 s by default, or the
shorter ``expiry`` of the upload), and all of them together keep at most ``max_bytes`` on disk
(``--conf sessions_max_bytes``, 4 GiB by default): a new session makes the least recently used
ones expire first."""
from __future__ import annotations

import logging
import os
import threading

from monailabel.utils.sessions import SessionInfo, Sessions

log = logging.getLogger(__name__)


def disk_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (a file or a folder)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class SessionsFull(ValueError):
    """One upload alone is larger than the sessions' disk cap."""


class StudySessions(Sessions):
    """MONAI Label's session store; ``add_study`` records ``meta`` in the session's meta.info, so it
    survives a restart of the server as the session does, and keeps the store under ``max_bytes``."""

    def __init__(self, store_path: str, expiry: int, max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self._cap_lock = threading.RLock()  # adding a session and making room for it are one step
        super().__init__(store_path, expiry)

    def add_study(self, source: str, expiry: int, meta: dict) -> tuple[str, SessionInfo]:
        """A new session holding ``source`` (a file or folder, moved into the store). Raises
        SessionsFull when ``source`` alone exceeds ``max_bytes``."""
        with self._cap_lock:
            if self.max_bytes is not None:
                self.make_room(disk_bytes(source))
            session_id, info = self.add_session(source, expiry)
            info.meta = dict(meta)
            self._write_meta_info(session_id, info)
        return session_id, info

    def remove_expired(self) -> int:
        """MONAI Label's expiry, after removing session folders without meta.info (partly written
        when the server was killed while adding them; MONAI Label's own pass fails on them)."""
        removed = 0
        if os.path.isdir(self.store_path):
            with self._cap_lock:  # re-entrant: make_room holds it already
                for name in os.listdir(self.store_path):
                    path = os.path.join(self.store_path, name)
                    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "meta.info")):
                        self.remove_session(name)
                        removed += 1
        return removed + super().remove_expired()

    def make_room(self, incoming: int) -> list[str]:
        """Remove the least recently used sessions until ``incoming`` more bytes fit under
        ``max_bytes``; returns the removed ids."""
        if incoming > self.max_bytes:
            raise SessionsFull(f"the upload takes {incoming:,} bytes; upload sessions together may take at most "
                               f"{self.max_bytes:,} (--conf sessions_max_bytes)")
        self.remove_expired()
        sizes = []
        for name in os.listdir(self.store_path) if os.path.isdir(self.store_path) else []:
            info = self.get_session(name, update_ts=False)
            if info is not None:
                made = os.stat(os.path.join(self.store_path, name)).st_mtime_ns  # orders sessions used in the same second
                sizes.append((info.last_access_ts, made, name, disk_bytes(info.path)))
        total = sum(s[-1] for s in sizes)
        removed = []
        for _, _, name, size in sorted(sizes):
            if total + incoming <= self.max_bytes:
                break
            self.remove_session(name)
            total -= size
            removed.append(name)
        if removed:
            log.info("expired %d upload session(s) early: the sessions' disk cap (--conf sessions_max_bytes) was reached", len(removed))
        return removed
