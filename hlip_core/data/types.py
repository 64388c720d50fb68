"""The objects ingestion hands out: Scan, Study, Skipped, and the options that steer it."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .limits import DEFAULT_MAX_VOXELS

# reason code -> words a person reads in "series 7 'Scout' (1.2.3...): localizer (ImageType LOCALIZER)"
REASONS = {
    "not_dicom": "not a DICOM or volume file",
    "dicomdir": "DICOMDIR index (its images are read from the tree itself)",
    "unreadable": "unreadable header",
    "duplicate": "duplicate instance",
    "conflict": "copies of one instance with different pixels",
    "not_image": "not an image",
    "secondary_capture": "secondary capture",
    "localizer": "localizer",
    "derived": "derived series",
    "colour": "colour image",
    "missing_geometry": "no slice geometry",
    "mixed_orientation": "mixed orientation or image size",
    "too_few_slices": "too few slices",
    "inconsistent_spacing": "inconsistent slice spacing",
    "unequal_repeats": "repeated slice positions with unequal counts",
    "volume_not_selected": "volume of a repeated series not selected",
    "truncated": "truncated file",
    "too_large": "larger than the voxel limit (max_voxels)",
    "non_finite": "non-finite voxels (NaN or infinity)",
    "undecodable": "undecodable pixel data",
    "unreadable_volume": "unreadable volume file",
    "no_usable_scan": "no usable scan in the study",
    "failed": "failed",
}


@dataclass
class Skipped:
    """A file, series or volume that was not used, with its reason (a code of REASONS).

    Holds no patient data: series number, description, UID, file names and counts only.
    """

    kind: str  # "file" | "series" | "volume" | "study"
    reason: str
    detail: str = ""
    series_number: int | None = None
    description: str = ""
    uid: str = ""
    files: list[str] = field(default_factory=list)
    kept: str = ""  # for a copy of an instance that was not used: the file that was used instead

    def __str__(self) -> str:
        words = REASONS.get(self.reason, self.reason)
        if self.detail:
            words = f"{words} ({self.detail})"
        if self.kept:
            words = f"{words}; the copy in {self.kept} was used"
        if self.kind == "file":
            name = Path(self.files[0]).name if self.files else "?"
            return f"file {name}: {words}"
        if self.kind == "study":
            return f"study: {words}"
        number = "?" if self.series_number is None else self.series_number
        what = "volume of series" if self.kind == "volume" else "series"
        return f"{what} {number} '{self.description}' ({_short(self.uid)}): {words}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _short(uid: str) -> str:
    return uid if len(uid) <= 24 else uid[:21] + "..."


@dataclass
class Scan:
    """One usable volume of a study.

    image: SimpleITK.Image in the original geometry (origin/spacing/direction as SimpleITK reads the
    same series), rescale slope/intercept applied. header: non-identifying facts only.
    """

    scan_id: str
    modality: str
    description: str
    image: Any
    files: list[str] = field(default_factory=list)
    header: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        size = tuple(self.image.GetSize()) if self.image is not None else None
        return f"Scan({self.scan_id!r}, {self.modality}, {self.description!r}, size={size})"


@dataclass
class Study:
    """The usable scans of one study, in a stable order, and everything that was skipped."""

    study_id: str
    scans: list[Scan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    study_uid: str | None = None
    # only to look reports up by it; never written to any output
    accession_number: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class IngestOptions:
    """How series are selected and assembled (keyword options of load_study / prepare_archive).

    min_slices: volumes with fewer slices are skipped (localisers, single images).
    keep_derived: keep series whose ImageType starts with DERIVED (True: reformats and rebuilt
        series such as the public studyforrest T1w are real scans).
    max_gap: up to this many consecutive missing slices are filled by linear interpolation between
        their neighbours (the scan header lists them); a larger gap skips the series.
    repeated: series with several images per slice position (time series, diffusion, multi-echo):
        "split" into one volume each, or keep only the "first" or "last".
    max_volumes: a split series keeps at most this many volumes (the rest are reported skipped).
    volume_modality: modality given to NIfTI/NRRD/MHA files ("MR", "CT", ... or "auto": CT when
        the 1st intensity percentile is below -500, else MR).
    study_ids: output study ids of DICOM studies: "uid" (StudyInstanceUID), "hash" (of the UID)
        or "folder" (the folder holding the study's files, relative to the source).
    max_voxels: NIfTI volumes and DICOM series with more voxels are skipped ("too_large") before
        their data are read (see hlip_core.data.limits: its default fits any real CT/MR study).
    """

    min_slices: int = 8
    keep_derived: bool = True
    max_gap: int = 2
    repeated: str = "split"
    max_volumes: int = 16
    volume_modality: str = "MR"
    study_ids: str = "uid"
    max_voxels: int = DEFAULT_MAX_VOXELS

    @classmethod
    def from_kwargs(cls, options: dict) -> "IngestOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown ingestion option(s) {unknown}; known: {sorted(names)}")
        made = cls(**options)
        if made.repeated not in ("split", "first", "last"):
            raise ValueError(f"repeated must be 'split', 'first' or 'last', got {made.repeated!r}")
        if made.study_ids not in ("uid", "hash", "folder"):
            raise ValueError(f"study_ids must be 'uid', 'hash' or 'folder', got {made.study_ids!r}")
        if made.min_slices < 1 or made.max_gap < 0 or made.max_volumes < 1:
            raise ValueError("min_slices and max_volumes must be >= 1 and max_gap >= 0")
        return made
