"""The datastore's embedding cache: every study embedded once, in the background, kept on disk.

Folder layout (``<cache>/index/<model fingerprint>/``): ``embeddings.npy`` + ``ids.json``
(``hlip_core.eval.EmbeddingIndex``; from ``approximate_from`` studies on also its FAISS index,
``faiss.index`` + ``faiss.json``, rebuilt at each save) and ``embedded.json``, which says for each study what was
embedded (its signature and the files with their mtimes, or the series with their instance counts)
and which studies could not be used and why. A study is embedded again only when its signature
changes; a new checkpoint starts a new folder. Writes are atomic (rename into place), so a kill at
any moment leaves the last complete state.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .worker import BACKGROUND

log = logging.getLogger(__name__)

MANIFEST = "embedded.json"
SAVE_EVERY_SECONDS = 5.0


def model_fingerprint(checkpoint: str | os.PathLike, *settings: str) -> str:
    """Changes when the checkpoint's weights or configuration change, or any of ``settings`` (the
    precision, the modality given to volume files: whatever changes a study's embedding)."""
    h = hashlib.sha256("\0".join(settings).encode())
    folder = Path(checkpoint)
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class StudyIndexer:
    def __init__(self, datastore, worker, embed_fn, folder: str | os.PathLike, rescan_seconds: float = 30.0, enabled: bool = True,
                 approximate_from: int | None = None, nprobe: int | None = None):
        self.datastore = datastore
        self.worker = worker
        self.embed_fn = embed_fn  # embed_fn(study_entry) -> [E] on the worker thread
        self.folder = Path(folder)
        self.rescan_seconds = rescan_seconds
        self.enabled = enabled
        from hlip_core.eval.retrieval import APPROXIMATE_FROM, NPROBE

        self.approximate_from = APPROXIMATE_FROM if approximate_from is None else approximate_from
        self.nprobe = NPROBE if nprobe is None else nprobe
        self._vectors: dict[str, np.ndarray] = {}
        self._embedded: dict[str, dict] = {}  # study id -> {"signature", "detail"}
        self._failed: dict[str, dict] = {}  # study id -> {"signature", "reason"}
        self._index = None  # EmbeddingIndex of _vectors at the last save: what searches read
        self._trained = None  # the last EmbeddingIndex with a FAISS index, whose quantisers a rebuild reuses
        self._dirty = False
        self._current: str | None = None
        self._spent = [0, 0.0]  # studies embedded by this process, seconds the worker spent on them
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="hlip-index", daemon=True)
        self._load()

    # -- state ----------------------------------------------------------------------------------

    def _load(self) -> None:
        from hlip_core.eval import EmbeddingIndex

        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
            try:
                index = EmbeddingIndex.load(self.folder, mmap=False)
            except ValueError as e:  # an unusable FAISS index costs only its rebuild, not the cache
                if not any((self.folder / name).exists() for name in ("faiss.index", "faiss.json")):
                    raise
                log.warning("embedding cache in %s: approximate index not used (%s); it is rebuilt", self.folder, e)
                index = EmbeddingIndex.load(self.folder, mmap=False, approximate=False)
        except (OSError, ValueError) as e:
            if self.folder.exists():
                log.warning("embedding cache in %s not readable (%s); starting empty", self.folder, e)
            return
        rows = {sid: np.asarray(index.embeddings[i], dtype=np.float32) for i, sid in enumerate(index.ids)}
        for sid, entry in manifest.get("studies", {}).items():
            if sid in rows:
                self._vectors[sid] = rows[sid]
                self._embedded[sid] = entry
        self._failed = manifest.get("failed", {})
        self._trained = index  # its FAISS quantisers are reused by the rebuild
        self._rebuild()
        log.info("embedding cache: %d studies loaded from %s", len(self._vectors), self.folder)

    def _rebuild(self, approximate: bool = True) -> None:
        """Make the index searches read from the vectors; with ``approximate`` and from
        ``approximate_from`` studies on, with a FAISS index (saves during a fill skip it: until the
        fill ends, the new rows are searched exactly)."""
        from hlip_core.eval import EmbeddingIndex

        ids = sorted(self._vectors)
        if ids:
            index = EmbeddingIndex.build(np.stack([self._vectors[i] for i in ids]), ids)
            if approximate and len(index) >= self.approximate_from:  # quantisers reused while not outgrown
                index.build_ann(nprobe=self.nprobe, embedding="reports", like=self._trained)
                self._trained = index
            self._index = index
        else:
            self._index = None

    def _save(self, approximate: bool = True) -> None:
        with self._lock:
            self._rebuild(approximate)
            index = self._index
            manifest = {"studies": {k: self._embedded[k] for k in sorted(self._vectors)}, "failed": dict(self._failed)}
            self._dirty = False
        self.folder.mkdir(parents=True, exist_ok=True)
        if index is not None:
            index.save(self.folder)
        else:
            for name in ("embeddings.npy", "ids.json", "faiss.index", "faiss.json"):
                (self.folder / name).unlink(missing_ok=True)
        tmp = self.folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, self.folder / MANIFEST)

    def state(self, study) -> str:
        """'embedded', 'pending' or 'failed' for a catalog study."""
        e = self._embedded.get(study.study_id)
        if e is not None and e["signature"] == study.signature and study.study_id in self._vectors:
            return "embedded"
        f = self._failed.get(study.study_id)
        if f is not None and f["signature"] == study.signature:
            return "failed"
        return "pending"

    def failure(self, study_id: str) -> str | None:
        f = self._failed.get(study_id)
        return f["reason"] if f else None

    def counts(self) -> dict:
        studies = self.datastore.catalog.studies()
        states = [self.state(s) for s in studies.values()]
        return {"indexed": len(self._index) if self._index is not None else 0, "pending": states.count("pending"),
                "failed": states.count("failed"), "embedding": self._current}

    def throughput(self) -> dict:
        n, seconds = self._spent
        return {"embedded_since_start": n, "seconds_per_study": round(seconds / n, 3) if n else None}

    def search(self, queries: np.ndarray, k: int, exclude: list | None = None):
        index = self._index
        if index is None:
            return [[] for _ in range(len(queries))]
        return index.search(queries, k, exclude=exclude)

    def vector(self, study_id: str) -> np.ndarray | None:
        return self._vectors.get(study_id)

    # -- the background loop --------------------------------------------------------------------

    def start(self) -> "StudyIndexer":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def poke(self) -> None:
        """Look at the datastore now (a study was just found by a request)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datastore.refresh()
                if self.enabled:
                    self._fill()
            except Exception:  # a PACS that is down must not end the loop; try again later
                log.exception("embedding cache: refresh failed; retrying in %.0f s", self.rescan_seconds)
            self._wake.wait(self.rescan_seconds)
            self._wake.clear()

    def _fill(self) -> None:
        studies = self.datastore.catalog.studies()
        gone = [sid for sid in self._vectors if sid not in studies]
        if gone:
            with self._lock:
                for sid in gone:
                    self._vectors.pop(sid, None)
                    self._embedded.pop(sid, None)
                self._dirty = True
        last_save = time.monotonic()
        for study in list(studies.values()):
            if self._stop.is_set():
                break
            if self.state(study) != "pending":
                continue
            self._current = study.study_id
            def timed(s=study):
                start = time.perf_counter()
                v = self.embed_fn(s)
                self._spent = [self._spent[0] + 1, self._spent[1] + time.perf_counter() - start]
                return v

            try:
                vector = self.worker.submit(timed, BACKGROUND).result()
            except ValueError as e:  # NoUsableScanError and other "this study cannot be used" answers
                log.warning("embedding cache: study %s not usable: %s", study.study_id, e)
                with self._lock:
                    self._failed[study.study_id] = {"signature": study.signature, "reason": str(e)}
                    self._dirty = True
                continue
            except Exception as e:  # download errors and the like: try again at the next rescan
                if self._stop.is_set():
                    break
                log.warning("embedding cache: study %s failed (%s); will retry", study.study_id, e)
                continue
            finally:
                self._current = None
            with self._lock:
                self._vectors[study.study_id] = np.asarray(vector, dtype=np.float32)
                self._embedded[study.study_id] = {"signature": study.signature, "detail": study.detail}
                self._failed.pop(study.study_id, None)
                self._dirty = True
            if time.monotonic() - last_save > SAVE_EVERY_SECONDS:
                self._save(approximate=False)
                last_save = time.monotonic()
        if self._dirty:
            self._save()
