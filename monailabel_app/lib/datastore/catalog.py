"""What a datastore holds, seen as studies: each study a list of scans, each scan one MONAI Label image.

Both datastores (a local folder of study folders, a DICOMweb server) keep a ``StudyCatalog``: an
immutable snapshot of studies that a background refresh replaces in one assignment, so requests read
it without locks, plus a map from every image id to its study.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256


def unsafe_id_reason(value: str) -> str | None:
    """Why ``value`` cannot be a study, image or session id (None when it can): ids name files
    and folders, so nothing that could climb out of the datastore or the cache is accepted."""
    if not value:
        return "is empty"
    if len(value) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if "/" in value or "\\" in value:
        return "contains a path separator ('/' or '\\')"
    if ".." in value:
        return "contains '..'"
    if any(ord(c) < 32 for c in value):
        return "contains control characters"
    if value.startswith("."):
        return "starts with '.'"
    return None


@dataclass
class ScanEntry:
    image_id: str
    description: str = ""
    modality: str = ""
    files: list[str] = field(default_factory=list)  # local files; DICOMweb scans are downloaded on demand
    series_uid: str | None = None

    def public(self) -> dict:
        out = {"image_id": self.image_id, "description": self.description}
        if self.modality:
            out["modality"] = self.modality
        return out


@dataclass
class StudyEntry:
    study_id: str
    scans: list[ScanEntry]
    signature: str  # changes whenever the study's content changes: the embedding cache key
    detail: dict = field(default_factory=dict)  # what the signature was made of (files and mtimes, or series and counts)
    temporary: bool = False  # an upload session: never cached nor indexed


def signature_of(items) -> str:
    h = hashlib.sha256()
    for item in sorted(items):
        h.update(repr(item).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


class StudyCatalog:
    """Studies by id and image id -> study id. ``replace`` swaps in a new snapshot atomically."""

    def __init__(self):
        self._studies: dict[str, StudyEntry] = {}
        self._by_image: dict[str, str] = {}
        self.lock = threading.RLock()  # serialises refreshes (readers never take it)
        self.ready = threading.Event()  # set after the first complete scan of the datastore

    def replace(self, studies: dict[str, StudyEntry]) -> None:
        by_image = {}
        for sid, st in studies.items():
            for sc in st.scans:
                by_image[sc.image_id] = sid
        self._studies, self._by_image = dict(studies), by_image

    def add(self, study: StudyEntry) -> None:
        with self.lock:
            studies = dict(self._studies)
            studies[study.study_id] = study
            self.replace(studies)

    def studies(self) -> dict[str, StudyEntry]:
        return self._studies

    def get(self, study_or_image_id: str) -> StudyEntry | None:
        studies = self._studies
        if study_or_image_id in studies:
            return studies[study_or_image_id]
        sid = self._by_image.get(study_or_image_id)
        return studies.get(sid) if sid is not None else None

    def scan(self, image_id: str) -> ScanEntry | None:
        st = self.get(image_id)
        if st is None:
            return None
        return next((s for s in st.scans if s.image_id == image_id), None)

    def image_ids(self) -> list[str]:
        return list(self._by_image)

    def monai_json(self, name: str) -> dict:
        """The datastore as MONAI Label's ``GET /datastore/?output=all`` gives it, ``{"name",
        "objects": {image_id: {"image": {"info": {study_id, description, modality}}, "labels": {}}}}``
        (what ``MONAILabelClient.datastore()`` reads), plus the study grouping ``"studies":
        {study_id: [{image_id, description, modality}]}``."""
        studies = self._studies
        objects = {sc.image_id: {"image": {"info": {"study_id": sid, **sc.public()}}, "labels": {}}
                   for sid, st in studies.items() for sc in st.scans}
        return {"name": name, "objects": objects, "studies": {sid: [sc.public() for sc in st.scans] for sid, st in studies.items()}}
