"""What the HTTP routes ask of the app: studies resolved from ids, findings through the worker,
search and similarity over the embedding cache. Errors are raised as ``HTTPException`` with a
sentence saying what is wrong."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

import numpy as np
from fastapi import HTTPException

from .datastore.catalog import ScanEntry, StudyEntry, unsafe_id_reason
from .worker import INTERACTIVE, QueueFull

log = logging.getLogger(__name__)

MAX_K = 100
MAX_TEXT = 300


def check_id(value: str, what: str) -> str:
    reason = unsafe_id_reason(value)
    if reason:
        raise HTTPException(status_code=400, detail=f"{what} {value[:80]!r} {reason}; ids are plain names without '/' or '..'")
    return value


def check_k(k: int) -> int:
    if not 1 <= k <= MAX_K:
        raise HTTPException(status_code=400, detail=f"k must be between 1 and {MAX_K}, got {k}")
    return k


class HLIPService:
    def __init__(self, config, datastore, task, worker, indexer, sessions):
        self.config = config
        self.datastore = datastore
        self.task = task
        self.worker = worker
        self.indexer = indexer
        self.sessions = sessions
        self._queries: OrderedDict = OrderedDict()  # text -> embedding, for repeated searches
        self._query_lock = threading.Lock()

    # -- studies --------------------------------------------------------------------------------

    def known(self, study_or_image_id: str) -> StudyEntry | None:
        """The study of a study or image id already in the catalog (no I/O), else None."""
        return None if unsafe_id_reason(study_or_image_id) else self.datastore.catalog.get(study_or_image_id)

    def resolve(self, study_or_image_id: str) -> StudyEntry:
        """The study of a study id or image id; looks in the datastore when it is not known yet (blocking I/O)."""
        check_id(study_or_image_id, "image or study id")
        catalog = self.datastore.catalog
        study = catalog.get(study_or_image_id)
        if study is None:  # a folder copied in (or a study sent to the PACS) since the last scan
            study = self.datastore.refresh_one(study_or_image_id)
        if study is None:
            hint = "" if catalog.ready.is_set() else " (the datastore is still being scanned; try again shortly)"
            raise HTTPException(status_code=404, detail=f"no study or image with this id in the datastore{hint}")
        return study

    def session_info(self, session_id: str, update_ts: bool = False):
        """MONAI Label's SessionInfo of an upload session: 400 for an unsafe id, 406 with sessions
        off, 404 for an unknown or expired one."""
        check_id(session_id, "session id")
        if self.sessions is None:
            raise HTTPException(status_code=406, detail="upload sessions are switched off on this server (MONAI_LABEL_SESSIONS=false)")
        info = self.sessions.get_session(session_id, update_ts=update_ts)
        if info is None:
            raise HTTPException(status_code=404, detail="no upload session with this id (expired or never created; PUT /session/ first)")
        return info

    def session_study(self, session_id: str) -> StudyEntry:
        info = self.session_info(session_id)
        image = info.image
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(image) for f in fs) if os.path.isdir(image) else [image]
        files = [f for f in files if os.path.basename(f) != "meta.info"]
        modalities = (info.meta or {}).get("modalities", {})  # what the upload's 'scans' field said
        scans = [ScanEntry(os.path.basename(f), os.path.basename(f), modalities.get(os.path.basename(f), ""), [f]) for f in files]
        return StudyEntry(session_id, scans, signature="", temporary=True)

    def files_of(self, study: StudyEntry) -> list[str]:
        if study.temporary:
            return [f for sc in study.scans for f in sc.files]
        return self.datastore.study_files(study)

    def studies(self) -> list[dict]:
        out = []
        for study in self.datastore.catalog.studies().values():
            state = self.indexer.state(study)
            row = {"study_id": study.study_id, "scans": [sc.public() for sc in study.scans], "embedded": state == "embedded"}
            if state == "failed":
                row["error"] = self.indexer.failure(study.study_id)
            out.append(row)
        return out

    # -- findings -------------------------------------------------------------------------------

    def findings_names(self, params: dict) -> list[str]:
        from hlip_core.eval.zeroshot import findings_from_text

        findings = params.get("findings")
        if findings is None:
            findings = list(self.config.findings)
        if isinstance(findings, str):
            findings = [f for f in findings.split(";")]
        if not isinstance(findings, list) or not all(isinstance(f, str) for f in findings):
            raise HTTPException(status_code=400, detail="params.findings must be a list of strings, e.g. [\"intracranial hemorrhage\"]")
        if not findings:
            raise HTTPException(status_code=400, detail="no findings given; ask for at least one, e.g. \"intracranial hemorrhage\"")
        if len(findings) > self.config.max_findings:
            raise HTTPException(status_code=400, detail=f"{len(findings)} findings asked; this server answers at most {self.config.max_findings} per request")
        try:
            return [f.name for f in findings_from_text(findings)]
        except ValueError as e:
            raise HTTPException(status_code=400, detail=str(e)) from None

    def want_heatmaps(self, params: dict) -> bool:
        value = params.get("heatmaps", False)
        if not isinstance(value, bool):
            raise HTTPException(status_code=400, detail="params.heatmaps must be true or false")
        if value and not self.config.heatmaps:
            raise HTTPException(status_code=400, detail="heat maps are switched off on this server (--conf heatmaps false); ask with \"heatmaps\": false")
        return value

    def heatmap_options(self, params: dict) -> tuple[str, bool]:
        """(format, all scans) of the heat maps asked: ``heatmap_format`` "parts" (one file part per
        map) or "zip" (one heatmaps.zip part), by default "zip" for MONAI Label's own client (its
        params always carry ``client_id``; it keeps one file of an answer) and "parts" otherwise;
        ``heatmap_scans`` "driving" (default: the driving scan's map) or "all" (every scan's)."""
        from .infers.hlip_findings import HEATMAP_FORMATS, HEATMAP_SCANS

        fmt = params.get("heatmap_format", "zip" if "client_id" in params else HEATMAP_FORMATS[0])
        if fmt not in HEATMAP_FORMATS:
            raise HTTPException(status_code=400, detail=f"params.heatmap_format must be one of {', '.join(HEATMAP_FORMATS)}")
        scans = params.get("heatmap_scans", HEATMAP_SCANS[0])
        if scans not in HEATMAP_SCANS:
            raise HTTPException(status_code=400, detail=f"params.heatmap_scans must be one of {', '.join(HEATMAP_SCANS)}")
        return fmt, scans == "all"

    def submit_findings(self, study: StudyEntry, findings: list[str], heatmaps: bool, started: float,
                        heatmap_format: str = "parts", all_scans: bool = False):
        """A Future of the answer computed on the worker: the JSON dict, or with heat maps the
        finished multipart body (bytes, content type), so the event loop only sends it. 503 when
        the queue is full. ``started``: the request's perf_counter start, for elapsed_ms (since the
        request arrived) beside compute_ms (the study's loading and the model's work alone).
        ``heatmap_format``, ``all_scans``: see ``heatmap_options``."""

        def job():
            begin = time.perf_counter()
            result, parts = self.task.predict(study, self.files_of, findings, heatmaps, all_scans=all_scans)
            end = time.perf_counter()
            result["compute_ms"] = round(1000 * (end - begin), 1)
            result["elapsed_ms"] = round(1000 * (end - started), 1)
            return multipart(result, parts, zipped=heatmap_format == "zip") if heatmaps else result

        try:
            future = self.worker.submit(job, INTERACTIVE)
        except QueueFull as e:
            raise HTTPException(status_code=503, detail=str(e), headers={"Retry-After": str(e.retry_after)}) from None
        if not study.temporary and self.indexer.state(study) == "pending":
            future.add_done_callback(lambda _: self.indexer.poke())  # embed it once this request is answered
        return future

    # -- search ---------------------------------------------------------------------------------

    def text_vector(self, text: str) -> np.ndarray:
        """Normalised embedding [E] of a query text (the text tower only; safe beside the worker)."""
        import torch
        from hlip_core.model import autocast

        with self._query_lock:
            hit = self._queries.get(text)
            if hit is not None:
                self._queries.move_to_end(text)
                return hit
            predictor = self.task.predictor
            with torch.no_grad(), autocast(predictor.device, predictor.precision):
                z = predictor.model.encode_text([text]).float()
            z = torch.nn.functional.normalize(z, dim=-1)[0].cpu().numpy()
            self._queries[text] = z
            while len(self._queries) > 1024:
                self._queries.popitem(last=False)
            return z

    def _results(self, hits) -> list[dict]:
        catalog = self.datastore.catalog
        out = []
        for sid, score in hits:
            study = catalog.get(sid)
            if study is None:  # removed from the datastore since the index was saved
                continue
            out.append({"study_id": sid, "score": round(float(score), 6), "scans": [sc.public() for sc in study.scans]})
        return out

    def _check_index(self) -> None:
        if not self.indexer.enabled:
            raise HTTPException(status_code=409, detail="search is switched off on this server: it keeps no embedding cache (--conf index false)")

    def search(self, text: str, k: int) -> dict:
        self._check_index()
        text = " ".join((text or "").split())
        if not text:
            raise HTTPException(status_code=400, detail="the search text is empty; describe what to look for, e.g. \"midline shift\"")
        if len(text) > MAX_TEXT:
            raise HTTPException(status_code=400, detail=f"the search text is {len(text)} characters long; the limit is {MAX_TEXT}")
        check_k(k)
        hits = self.indexer.search(self.text_vector(text)[None], k)[0]
        return {"query": text, "results": self._results(hits), **self._counts()}

    def similar(self, study_or_image_id: str, k: int) -> dict:
        self._check_index()
        check_k(k)
        study = self.resolve(study_or_image_id)
        vector = self.indexer.vector(study.study_id)
        if vector is None:
            state = self.indexer.state(study)
            if state == "failed":
                raise HTTPException(status_code=422, detail=f"study {study.study_id} has no embedding: {self.indexer.failure(study.study_id)}")
            raise HTTPException(status_code=409, detail=f"study {study.study_id} is not embedded yet ({self._counts()['pending']} studies pending); try again shortly",
                                headers={"Retry-After": "5"})
        hits = self.indexer.search(vector[None], k, exclude=[study.study_id])[0]
        return {"query": study.study_id, "results": self._results(hits), **self._counts()}

    def _counts(self) -> dict:
        c = self.indexer.counts()
        return {"indexed": c["indexed"], "pending": c["pending"]}

    def status(self) -> dict:
        return {"worker": self.worker.status(), "index": {"enabled": self.indexer.enabled, **self.indexer.counts(), **self.indexer.throughput()},
                "datastore": self.datastore.status()}


HEATMAP_ZIP = "heatmaps.zip"


def multipart(result: dict, parts: list, zipped: bool = False) -> tuple[bytes, str]:
    """The heat-map answer as (body, content type): a form field ``params`` (the JSON, as MONAI
    Label names it), then one file part ``<name>.nii.gz`` per heat map in ``parts`` [(name, bytes)],
    or with ``zipped`` one file part heatmaps.zip holding them as ``<name>.nii.gz`` (stored: they
    are gzip already); the JSON then says ``"heatmap_file": "heatmaps.zip"``."""
    import io
    import json
    import zipfile

    from requests_toolbelt import MultipartEncoder

    if zipped:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
            for name, data in parts:
                z.writestr(f"{name}.nii.gz", data)
        result = {**result, "heatmap_file": HEATMAP_ZIP}
        files = [(HEATMAP_ZIP, (HEATMAP_ZIP, buffer.getvalue(), "application/zip"))]
    else:
        files = [(name, (f"{name}.nii.gz", data, "application/octet-stream")) for name, data in parts]
    fields = [("params", (None, json.dumps(result), "application/json"))] + files
    encoder = MultipartEncoder(fields=fields)
    return encoder.to_string(), encoder.content_type
