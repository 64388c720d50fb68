"""A DICOMweb server (Orthanc, a PACS) as a datastore of studies: a study is every image series of
one StudyInstanceUID; an image id is a SeriesInstanceUID (as in MONAI Label's DICOMweb datastore).

Series are downloaded once into the cache (``<cache>/<md5 of the URL>/<SeriesInstanceUID>/``, the
folder MONAI Label's own datastore uses), atomically, so a broken download is never taken for a
complete one. A series asked for as a volume (``GET /datastore/image``) is converted once by the
project's ingestion into ``<cache>/volumes/<SeriesInstanceUID>.nii.gz``, the grid of its heat maps.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series

from .catalog import ScanEntry, StudyCatalog, StudyEntry, signature_of, unsafe_id_reason
from .volumes import series_volume

log = logging.getLogger(__name__)

# series that are not images of the patient (segmentations, reports, presentation states, plans...)
NOT_IMAGES = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC", "FID", "AU", "ECG", "PLAN"}
FIELDS = ["StudyInstanceUID", "SeriesInstanceUID", "SeriesDescription", "Modality", "NumberOfSeriesRelatedInstances", "SeriesNumber"]
TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SeriesDescription": "0008103E",
        "Modality": "00080060", "NumberOfSeriesRelatedInstances": "00201209"}


def _value(ds: dict, name: str) -> str:
    v = ds.get(TAGS[name], {}).get("Value")
    return str(v[0]) if v else ""


class HLIPDicomWebDatastore(DICOMWebDatastore):
    def __init__(self, client, cache_path: str, **kwargs):
        super().__init__(client=client, search_filter={}, cache_path=cache_path, **kwargs)
        self.catalog = StudyCatalog()
        self._download_lock = threading.Lock()
        # beside MONAI Label's folder for this URL, not in it: that folder is watched and indexed by MONAI Label
        self.volumes_dir = os.path.join(cache_path, "volumes")

    @classmethod
    def from_settings(cls, url: str, cache_dir) -> "HLIPDicomWebDatastore":
        """A client for ``url`` with MONAI Label's DICOMweb settings (user, password, prefixes); the
        series are cached in MONAI_LABEL_DATASTORE_CACHE_PATH (or the older MONAI_LABEL_DICOMWEB_CACHE_PATH),
        or else in ``<cache_dir>/dicomweb``."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from monailabel.config import settings
        from monailabel.datastore.dicom import DICOMwebClientX

        user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME  # the new names, else the old
        password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = create_session_from_user_pass(user, password) if user and password else None
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX, stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache = (settings.MONAI_LABEL_DATASTORE_CACHE_PATH.strip() or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH.strip()
                 or os.path.join(str(cache_dir), "dicomweb"))
        return cls(client, cache_path=cache, fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME)

    # -- the catalog ----------------------------------------------------------------------------

    def _series(self, **filters) -> list[dict]:
        return self._client.search_for_series(fields=FIELDS, search_filters=filters or None, get_remaining=True)

    def _studies_from(self, series: list[dict]) -> dict[str, StudyEntry]:
        grouped: dict[str, list[ScanEntry]] = {}
        counts: dict[str, dict] = {}
        for ds in series:
            study_uid, series_uid, modality = _value(ds, "StudyInstanceUID"), _value(ds, "SeriesInstanceUID"), _value(ds, "Modality")
            if modality.upper() in NOT_IMAGES or unsafe_id_reason(study_uid) or unsafe_id_reason(series_uid):
                continue
            description = _value(ds, "SeriesDescription") or modality
            grouped.setdefault(study_uid, []).append(ScanEntry(series_uid, description, modality, [], series_uid=series_uid))
            counts.setdefault(study_uid, {})[series_uid] = _value(ds, "NumberOfSeriesRelatedInstances")
        return {sid: StudyEntry(sid, sorted(scans, key=lambda s: s.image_id), signature_of(counts[sid].items()), counts[sid])
                for sid, scans in grouped.items()}

    def refresh(self) -> bool:
        with self.catalog.lock:
            studies = self._studies_from(self._series())
            old = self.catalog.studies()
            changed = {k: v.signature for k, v in old.items()} != {k: v.signature for k, v in studies.items()}
            self.catalog.replace(studies)
            self.catalog.ready.set()
            return changed

    def refresh_one(self, study_or_image_id: str) -> StudyEntry | None:
        if unsafe_id_reason(study_or_image_id):
            return None
        with self.catalog.lock:
            series = self._series(StudyInstanceUID=study_or_image_id)
            if not series:  # maybe a series: find its study
                found = self._series(SeriesInstanceUID=study_or_image_id)
                if found:
                    series = self._series(StudyInstanceUID=_value(found[0], "StudyInstanceUID"))
            for study in self._studies_from(series).values():
                self.catalog.add(study)
            return self.catalog.get(study_or_image_id)

    def series_folder(self, series_uid: str) -> str:
        return os.path.realpath(os.path.join(self._datastore.image_path(), series_uid))

    def study_files(self, study: StudyEntry) -> list[str]:
        """Download every series of the study once; returns the DICOM files. A series whose
        instance count in the PACS (the catalog's) differs from the files kept is downloaded
        again: a PACS receives a series instance by instance, and a series first seen half-way
        must not stay half."""
        files = []
        for scan in study.scans:
            folder = self.series_folder(scan.series_uid)
            listed = str(study.detail.get(scan.series_uid, ""))
            expected = int(listed) if listed.isdigit() else None  # NumberOfSeriesRelatedInstances is optional in QIDO
            with self._download_lock:
                kept = os.listdir(folder) if os.path.isdir(folder) else []
                if not kept or (expected is not None and len(kept) != expected):
                    if kept:
                        log.info("series %s: %d instances kept, %d in the PACS now; downloading it again", scan.series_uid,
                                 len(kept), expected)
                    tmp = os.path.join(os.path.dirname(folder), f".{uuid.uuid4().hex}")
                    try:
                        dicom_web_download_series(study.study_id, scan.series_uid, tmp, self._client, self._fetch_by_frame)
                        shutil.rmtree(folder, ignore_errors=True)
                        os.replace(tmp, folder)
                    finally:
                        shutil.rmtree(tmp, ignore_errors=True)
            files += sorted(os.path.join(folder, f) for f in os.listdir(folder))
        return files

    # -- MONAI Label's interface, kept consistent with the catalog --------------------------------

    def get_image_uri(self, image_id: str) -> str:
        """The series as NIfTI, converted by the ingestion the model uses (not MONAI Label's own
        conversion), so that heat maps overlay it exactly; "" for an id that is no known series."""
        scan = self.catalog.scan(image_id) if not unsafe_id_reason(image_id) else None
        if scan is None:
            return ""  # MONAI Label answers 404; an id never becomes a path unless it is a known series
        study = self.catalog.get(image_id)
        files = self.study_files(StudyEntry(study.study_id, [scan], "", study.detail))
        return series_volume(files, Path(self.volumes_dir) / f"{image_id}.nii.gz", f"series {image_id} of study {study.study_id}")

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        scan = self.catalog.scan(image_id) if not unsafe_id_reason(image_id) else None
        if scan is None:
            return {}
        return {"study_id": self.catalog.get(image_id).study_id, "description": scan.description,
                "modality": scan.modality, "series_uid": scan.series_uid}

    def list_images(self) -> List[str]:
        return self.catalog.image_ids()

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return []

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return self.list_images()

    def datalist(self, full_path=True) -> List[Dict[str, Any]]:
        return []

    def status(self) -> Dict[str, Any]:
        studies = self.catalog.studies()
        return {"total": sum(len(s.scans) for s in studies.values()), "completed": 0, "label_tags": {},
                "studies": len(studies), "scanned": self.catalog.ready.is_set()}

    def json(self):
        return self.catalog.monai_json(self.name())
