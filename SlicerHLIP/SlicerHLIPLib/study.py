"""From the volumes a user has to one question to the server, and the answer back to those volumes.

The Slicer layer describes each loaded volume as a ``LocalVolume`` (keyed by its node id) and
writes the ones to upload as files; everything else (which volumes are checked by default,
whether the study is asked by id or uploaded, which volume each finding's heat map belongs to)
is decided here, without Slicer, so that the same code runs in Slicer and under pytest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .client import FindingsResult, HLIPClient, UploadedStudy, UploadFile, volume_suffix
from .tasks import CancelToken

ProgressCallback = Callable[[Optional[float], str], None]


@dataclass
class LocalVolume:
    key: str  # the caller's handle (a Slicer node id)
    name: str  # what the user calls it (node name)
    study_uid: Optional[str] = None  # DICOM StudyInstanceUID, when the volume came from DICOM
    modality: Optional[str] = None  # "CT", "MR"... when known
    server_study: Optional[str] = None  # the datastore study it was downloaded from
    server_image: Optional[str] = None  # its image id on the server
    server_study_images: tuple = ()  # every image id of that datastore study


def _study_of(volume: LocalVolume) -> Optional[str]:
    if volume.study_uid:
        return f"dicom:{volume.study_uid}"
    if volume.server_study:
        return f"server:{volume.server_study}"
    return None


def default_selection(volumes: list, active_key: Optional[str] = None) -> list:
    """Keys of the volumes checked by default: those of the active volume's study (DICOM
    StudyInstanceUID, or the server study it came from); else, if the scene holds exactly one
    study, its volumes; else the active volume alone (or the only volume). The user changes the
    rest."""
    by_key = {v.key: v for v in volumes}
    active = by_key.get(active_key) if active_key else None
    if active is not None and _study_of(active):
        study = _study_of(active)
        return [v.key for v in volumes if _study_of(v) == study]
    studies = {_study_of(v) for v in volumes if _study_of(v)}
    if len(studies) == 1:
        study = studies.pop()
        return [v.key for v in volumes if _study_of(v) == study]
    if active is not None:
        return [active.key]
    if len(volumes) == 1:
        return [volumes[0].key]
    return []


@dataclass
class Question:
    """How to ask about the chosen ``volumes``: by datastore id when ``study_id`` is set (nothing is
    uploaded), otherwise by uploading every volume."""

    volumes: list  # LocalVolume, as chosen
    study_id: Optional[str] = None

    @property
    def uploads(self) -> list:
        return [] if self.study_id else list(self.volumes)


def plan_question(chosen: list) -> Question:
    """Volumes that are exactly the scans of one datastore study are asked by its id (nothing is
    uploaded, and the server's cached embedding is used); any other choice is uploaded."""
    if not chosen:
        raise ValueError("Choose the volumes of the study to ask about.")
    studies = {v.server_study for v in chosen}
    if len(studies) == 1 and None not in studies:
        images = {v.server_image for v in chosen}
        if images == set(chosen[0].server_study_images or images):
            return Question(list(chosen), study_id=chosen[0].server_study)
    return Question(list(chosen))


def upload_name(index: int, path: str) -> str:
    """The neutral name a volume is uploaded under (no node or patient name leaves the machine)."""
    return f"scan{index:02d}{volume_suffix(path) or '.nii.gz'}"


@dataclass
class Answer:
    result: FindingsResult
    row_keys: dict  # row index -> key of the local volume that drives that finding (None if unknown)
    scan_names: dict  # image id / uploaded name -> the user's name for that volume
    uploaded: Optional[UploadedStudy] = None


def _stage(progress: ProgressCallback, start: float, end: float) -> ProgressCallback:
    def report(fraction, message=""):
        progress(None if fraction is None else start + (end - start) * fraction, message)

    return report


def ask(client: HLIPClient, findings: list, question: Question, files: Optional[dict] = None, *, heatmaps: bool = True,
        out_dir=None, progress: ProgressCallback = lambda f, m="": None, cancel: Optional[CancelToken] = None,
        busy_retries: int = 2, compress: Optional[bool] = None) -> Answer:
    """Upload (when needed) and ask; map every finding back to a local volume.

    ``files``: key -> volume file written for each volume of ``question.uploads``.
    ``compress``: gzip uploads (default: when the server is not on this machine)."""
    cancel = cancel or CancelToken()
    names: dict = {}
    keys: dict = {}
    uploaded = None
    if question.study_id:
        for v in question.volumes:
            if v.server_image:
                keys[v.server_image] = v.key
                names[v.server_image] = v.name
        study_kw = {"study": question.study_id}
        upload_end = 0.0
    else:
        files = files or {}
        missing = [v.name for v in question.uploads if v.key not in files]
        if missing:
            raise ValueError(f"no file was written for {', '.join(missing)}")
        uploads = [UploadFile(files[v.key], upload_name(i, files[v.key]), v.modality) for i, v in enumerate(question.uploads)]
        upload_end = 0.4
        uploaded = client.upload_study(uploads, _stage(progress, 0.0, upload_end), cancel,
                                       compress=(not client.is_local) if compress is None else compress)
        sent = list(uploaded.files)  # in upload order; a .nii may have been sent as .nii.gz
        keys = {name: v.key for name, v in zip(sent, question.uploads)}
        names = {name: v.name for name, v in zip(sent, question.uploads)}
        study_kw = {"session_id": uploaded.session_id}
    result = client.findings(findings, heatmaps=heatmaps, out_dir=out_dir, progress=_stage(progress, upload_end, 1.0),
                             cancel=cancel, busy_retries=busy_retries, **study_kw)
    return Answer(result, {r.index: keys.get(r.image_id) for r in result.rows}, names, uploaded)
