"""Upload sessions (MONAI Label's ``PUT /session/``) that also keep what the upload said about its
files: the modality of each volume file, which a NIfTI/NRRD/MHA file does not carry itself.

Sessions expire after MONAI Label's ``MONAI_LABEL_SESSION_EXPIRY`` (3600 s by default, or the
shorter ``expiry`` of the upload), and all of them together keep at most ``max_bytes`` on disk
(``--conf sessions_max_bytes``, 4 GiB by default): a new session makes the least recently used
ones expire first.

Every read and write of the store (MONAI Label's ``get_session``, ``remove_session``, its expiry
pass and ``meta.info`` writes) holds one lock: concurrent uploads, deletes and expiry passes would
otherwise read a ``meta.info`` another thread is deleting or half way through writing (MONAI
Label's ``remove_expired`` then fails with AttributeError and the upload with 500)."""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

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

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        """MONAI Label's, under the store's lock; a ``meta.info`` that is not JSON (cut by a kill)
        counts as no session."""
        with self._cap_lock:
            try:
                return super().get_session(session_id, update_ts=update_ts, fetch_cache=fetch_cache)
            except ValueError:
                log.info("upload session with an unreadable meta.info (will be removed)")
                self.remove_session(session_id)
                return None

    def remove_session(self, session_id: str):
        with self._cap_lock:
            self.pop(session_id, None)
            super().remove_session(session_id)

    def _write_meta_info(self, session_id, session_info):
        """meta.info replaced whole (written beside the store, then renamed), never seen half written."""
        folder = os.path.join(self.store_path, session_id)
        with self._cap_lock:
            fd, part = tempfile.mkstemp(prefix=".meta-", suffix=".part", dir=self.store_path)
            try:
                with os.fdopen(fd, "w") as out:
                    out.write(session_info.to_str())
                os.replace(part, os.path.join(folder, "meta.info"))
            except BaseException:
                os.unlink(part)
                raise

    def remove_expired(self) -> int:
        """Remove expired sessions, session folders without a readable meta.info (partly written
        when the server was killed while adding them) and stray meta.info parts; returns how many
        sessions went. (MONAI Label's own pass fails on a folder without meta.info.)"""
        removed = 0
        if not os.path.isdir(self.store_path):
            return removed
        now = int(time.time())
        with self._cap_lock:  # re-entrant: make_room holds it already
            for name in os.listdir(self.store_path):
                path = os.path.join(self.store_path, name)
                if not os.path.isdir(path):
                    if name.startswith(".meta-") and name.endswith(".part"):
                        os.unlink(path)
                    continue
                info = self.get_session(name, update_ts=False, fetch_cache=False) if os.path.isfile(os.path.join(path, "meta.info")) else None
                if info is None or (info.expiry > 0 and info.last_access_ts + info.expiry < now):
                    self.remove_session(name)
                    removed += 1
        return removed

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
