"""A local studies folder as a read-only MONAI Label datastore: one sub-folder per study.

    studies/
      patient001_2024-01-02/      <- study id "patient001_2024-01-02"
        any/depth/*.dcm           <- DICOM series: image id = SeriesInstanceUID
        flair.nii.gz              <- a volume file: image id = "<study id>__flair"
      single_scan.nii.gz          <- a file at the top: a study of one scan (study id = image id = "single_scan")

Nothing is written into the studies folder: volumes converted from DICOM for download and the
header cache live in the server's cache folder.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore

from .catalog import ScanEntry, StudyCatalog, StudyEntry, signature_of, unsafe_id_reason
from .volumes import series_volume

log = logging.getLogger(__name__)

VOLUME_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
NOT_DICOM = {".txt", ".json", ".csv", ".md", ".png", ".jpg", ".jpeg", ".xml", ".zip", ".gz", ".tar", ".pdf",
             ".html", ".py", ".raw", ".mhd", ".nhdr", ".bval", ".bvec", ".lock", ".log", ".ini", ".db"}
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Modality", "SeriesNumber"]


def volume_stem(name: str) -> str | None:
    low = name.lower()
    for ext in VOLUME_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return None


def read_only(what: str):
    raise HTTPException(status_code=405, detail=f"{what}: this datastore is a read-only studies folder; "
                                                  "add studies by copying their folders into it")


class StudyFolderDatastore(Datastore):
    def __init__(self, root: str, cache_dir: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"studies folder {self.root} does not exist")
        self.cache_dir = Path(cache_dir)
        self.volumes_dir = self.cache_dir / "volumes"
        self.header_file = self.cache_dir / "catalog" / "dicom_headers.json"
        self.catalog = StudyCatalog()
        self._headers: dict[str, list] = self._load_headers()
        self._name = self.root.name

    # -- the catalog ----------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Walk the studies folder; returns True when any study appeared, changed or went away."""
        with self.catalog.lock:
            self._seen: set[str] = set()
            studies: dict[str, StudyEntry] = {}
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    study = self._scan_study(entry.name)
                    if study is not None:
                        studies[study.study_id] = study
                elif entry.is_file(follow_symlinks=False) and volume_stem(entry.name) is not None:
                    stem = volume_stem(entry.name)
                    if unsafe_id_reason(stem):
                        log.warning("skipping %s: its name cannot be an id (%s)", entry.path, unsafe_id_reason(stem))
                        continue
                    if stem in studies:
                        log.warning("skipping %s: a study called %s exists already", entry.path, stem)
                        continue
                    st = os.stat(entry.path)
                    scan = ScanEntry(stem, stem, "", [entry.path])
                    detail = {entry.name: st.st_mtime_ns}
                    studies[stem] = StudyEntry(stem, [scan], signature_of([(entry.name, st.st_size, st.st_mtime_ns)]), detail)
            self._dedupe_image_ids(studies)
            gone = set(self._headers) - self._seen
            if gone:  # files deleted since: forget their headers
                for path in gone:
                    del self._headers[path]
                self._headers_dirty = True
            old = self.catalog.studies()
            changed = {k: v.signature for k, v in old.items()} != {k: v.signature for k, v in studies.items()}
            self.catalog.replace(studies)
            self._save_headers()
            self.catalog.ready.set()
            return changed

    def refresh_one(self, study_or_image_id: str) -> StudyEntry | None:
        """Look for one study that the last refresh did not see (a folder just copied in)."""
        if unsafe_id_reason(study_or_image_id):
            return None
        path = self.root / study_or_image_id
        if path.is_dir():
            with self.catalog.lock:
                study = self._scan_study(study_or_image_id)
                if study is not None:
                    studies = dict(self.catalog.studies())
                    studies[study.study_id] = study
                    self._dedupe_image_ids(studies)
                    self.catalog.replace(studies)
                    self._save_headers()
                return self.catalog.get(study_or_image_id)
        return None

    def _scan_study(self, name: str) -> StudyEntry | None:
        reason = unsafe_id_reason(name)
        if reason:
            log.warning("skipping study folder %r: its name cannot be an id (%s)", name, reason)
            return None
        folder = self.root / name
        volumes, series, items, detail = [], {}, [], {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith("."):
                    continue
                path = os.path.join(dirpath, fn)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                rel = os.path.relpath(path, folder)
                stem = volume_stem(fn)
                if stem is not None:
                    volumes.append((stem, path))
                else:
                    if os.path.splitext(fn)[1].lower() in NOT_DICOM:
                        continue
                    header = self._header(path, st)
                    if header is None:
                        continue
                    series.setdefault(header[0], {"description": header[1], "modality": header[2], "files": []})["files"].append(path)
                items.append((rel, st.st_size, st.st_mtime_ns))
                detail[rel] = st.st_mtime_ns
        scans = []
        for uid, s in sorted(series.items()):
            scans.append(ScanEntry(uid, s["description"] or s["modality"], s["modality"], s["files"], series_uid=uid))
        for stem, path in volumes:
            image_id = f"{name}__{stem}"
            if unsafe_id_reason(image_id):
                log.warning("skipping %s: its name cannot be an id (%s)", path, unsafe_id_reason(image_id))
                continue
            scans.append(ScanEntry(image_id, stem, "", [path]))
        if not scans:
            return None
        return StudyEntry(name, scans, signature_of(items), detail)

    @staticmethod
    def _dedupe_image_ids(studies: dict[str, StudyEntry]) -> None:
        seen: dict[str, int] = {}
        for st in studies.values():
            for sc in st.scans:
                seen[sc.image_id] = seen.get(sc.image_id, 0) + 1
        for st in studies.values():
            for sc in st.scans:
                if seen[sc.image_id] > 1 or (sc.image_id in studies and sc.image_id != st.study_id):
                    sc.image_id = f"{st.study_id}__{sc.image_id}"  # the same series copied into two studies

    def _header(self, path: str, st) -> list | None:
        """[series uid, description, modality] of a DICOM file, or None; cached by size and mtime."""
        if hasattr(self, "_seen"):
            self._seen.add(path)
        cached = self._headers.get(path)
        if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
            return cached[2]
        import pydicom

        try:
            from hlip_core.data import require_dicom  # the ingestion's recognition, preamble or not

            require_dicom(path)
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS, force=True)
            uid = str(ds.SeriesInstanceUID)
            value = [uid, str(ds.get("SeriesDescription", "") or ""), str(ds.get("Modality", "") or "")]
            if unsafe_id_reason(uid):
                value = None
        except Exception:  # not DICOM, or no series: not an image of this datastore
            value = None
        self._headers[path] = [st.st_size, st.st_mtime_ns, value]
        self._headers_dirty = True
        return value

    def _load_headers(self) -> dict:
        try:
            return json.loads(self.header_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_headers(self) -> None:
        if not getattr(self, "_headers_dirty", False):
            return
        self.header_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.header_file.with_name(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._headers))
        os.replace(tmp, self.header_file)
        self._headers_dirty = False

    def study_files(self, study: StudyEntry) -> list[str]:
        return [f for sc in study.scans for f in sc.files]

    def volume_file(self, image_id: str) -> str:
        """A file of one scan for download: the volume file itself, or the DICOM series converted
        (once, into the cache) to NIfTI by the ingestion that the model uses, so heat maps overlay it exactly."""
        scan = self.catalog.scan(image_id) if not unsafe_id_reason(image_id) else None
        if scan is None:
            return ""
        if scan.series_uid is None:
            return scan.files[0]
        study = self.catalog.get(image_id)
        return series_volume(scan.files, self.volumes_dir / f"{image_id}.nii.gz", f"image {image_id} of study {study.study_id}")

    # -- MONAI Label's Datastore interface (read-only) -------------------------------------------

    def name(self) -> str:
        return self._name

    def set_name(self, name: str):
        self._name = name

    def description(self) -> str:
        return f"HLIP studies folder {self.root}"

    def set_description(self, description: str):
        pass

    def datalist(self) -> List[Dict[str, Any]]:
        return []

    def get_labels_by_image_id(self, image_id: str) -> Dict[str, str]:
        return {}

    def get_label_by_image_id(self, image_id: str, tag: str) -> str:
        return ""

    def get_image(self, image_id: str, params=None) -> Any:
        uri = self.get_image_uri(image_id)
        return open(uri, "rb") if uri else None

    def get_image_uri(self, image_id: str) -> str:
        return self.volume_file(image_id)

    def get_label(self, label_id: str, label_tag: str, params=None) -> Any:
        return None

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return ""

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        scan = self.catalog.scan(image_id) if not unsafe_id_reason(image_id) else None
        if scan is None:
            return {}
        study = self.catalog.get(image_id)
        return {"study_id": study.study_id, "description": scan.description, "modality": scan.modality,
                "series_uid": scan.series_uid, "files": len(scan.files)}

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return {}

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return []

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return self.list_images()

    def list_images(self) -> List[str]:
        return self.catalog.image_ids()

    def get_dataset_archive(self, limit_cases: Optional[int]) -> str:
        read_only("downloading the dataset as an archive")

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        read_only("adding an image")

    def remove_image(self, image_id: str) -> None:
        read_only("removing an image")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        read_only("saving a label")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        read_only("removing a label")

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        read_only("updating image info")

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        read_only("updating label info")

    def status(self) -> Dict[str, Any]:
        studies = self.catalog.studies()
        return {"total": sum(len(s.scans) for s in studies.values()), "completed": 0, "label_tags": {},
                "studies": len(studies), "scanned": self.catalog.ready.is_set()}

    def json(self):
        return self.catalog.monai_json(self._name)
