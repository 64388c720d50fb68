"""DICOM: header-only reading, series selection, and volume assembly with SimpleITK's geometry.

Headers are read up to the pixel data and only the tags this module uses are decoded (patient
fields never are): by the struct walker of header.py, or by pydicom (``stop_before_pixels``,
``specific_tags``) for what the walker does not follow. The byte offset of uncompressed pixel data
is remembered, so that assembly reads each file's pixels straight into the volume buffer with one
``readinto`` instead of parsing the file again (see benchmarks/ingest.py: on the real MRI this is
faster than dcm2niix converting the same files). Compressed pixel data goes through pydicom, then
SimpleITK (GDCM) if pydicom has no decoder for it.

Geometry follows SimpleITK's ImageSeriesReader on the same files: the origin is the position of
the first slice along the slice normal (the cross product of the row and column directions), the
direction is (row, column, normal), and the slice spacing is the distance between the first and
last slice positions divided by the number of slice steps.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .header import Fallback, FastFields, PydicomFields, read_fast
from .types import IngestOptions, Skipped

log = logging.getLogger(__name__)

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
# SOP classes that are never volumes, by prefix (the class name is reported)
NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state (PR)",
    "1.2.840.10008.5.1.4.1.1.66.4": "segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.66": "raw data / registration",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object (RT)",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
}
NON_IMAGE_MODALITIES = {"SR": "structured report (SR)", "PR": "presentation state (PR)", "SEG": "segmentation (SEG)",
                        "RTSTRUCT": "RT structure set (RTSTRUCT)", "RTPLAN": "RT plan", "RTDOSE": "RT dose",
                        "KO": "key object selection (KO)", "REG": "registration (REG)", "DOC": "document"}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
LOCALIZER_WORDS = ("localizer", "localiser", "scout", "survey", "topogram", "scanogram", "tripilot",
                   "tri-pilot", "3-plane", "3 plane", "3pl loc", "aahead_scout")

# The tags decoded from each file. Patient module tags are deliberately absent.
_TAGS = [
    0x00020002, 0x00020003, 0x00020010,  # meta: media SOP class / instance, transfer syntax
    0x00080008, 0x00080016, 0x00080018, 0x00080050, 0x00080060, 0x0008103E, 0x00081090, 0x00080070,
    0x00180010, 0x00180015, 0x00180050, 0x00180060, 0x00180080, 0x00180081, 0x00180082, 0x00180086,
    0x00180087, 0x00181314, 0x00180088, 0x00181210, 0x00181030, 0x00189087, 0x00189089, 0x00181060,
    0x00180024, 0x00180020, 0x00180021, 0x00201002,
    0x0020000D, 0x0020000E, 0x00200011, 0x00200012, 0x00200013, 0x00200032, 0x00200037, 0x00200100,
    0x00200105, 0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280030, 0x00280100,
    0x00280101, 0x00280103, 0x00281052, 0x00281053, 0x52009229, 0x52009230,
]


class HeaderError(Exception):
    """A file whose header cannot be used: ``reason`` is a REASONS code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Instance:
    """The facts of one DICOM file that ingestion uses (no patient data)."""

    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    series_number: int | None
    description: str
    image_type: tuple
    instance_number: int | None
    accession: str
    transfer_syntax: str
    rows: int | None = None
    cols: int | None = None
    frames: int = 1
    samples: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = False
    photometric: str = ""
    # per frame: (position, orientation, slope, intercept, volume key); one entry for single-frame
    positions: list = field(default_factory=list)
    orientations: list = field(default_factory=list)
    slopes: list = field(default_factory=list)
    intercepts: list = field(default_factory=list)
    volume_keys: list = field(default_factory=list)
    pixel_spacing: tuple | None = None
    # "native" (offset/length known), "encapsulated" (compressed), "other" (decode with pydicom),
    # "short" (the file ends inside the pixel data), "none" (no pixel data element)
    pixel_state: str = "none"
    pixel_offset: int | None = None  # first byte of native pixel values
    pixel_length: int | None = None
    file_size: int = 0
    facts: dict = field(default_factory=dict)


def _floats(value, n: int):
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


NOT_DICOM = ("not a DICOM file: no 'DICM' marker at byte 128 and no DICOM element (group 0002 or 0008) "
             "at its start")


def _dicom_head(head: bytes) -> bool:
    """A Part 10 file (DICM at byte 128) or a bare little-endian dataset starting with a group
    0x0002/0x0008 element (old exports without preamble, which pydicom reads only with
    ``force=True``)."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        return group in (0x0002, 0x0008) and element < 0x0200
    return False


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM file, from its first 132 bytes: the one recognition used by
    ingestion (prepare, load_study), the server's uploads and its DICOMweb downloads. True for a
    Part 10 file ('DICM' at byte 128) and for a dataset without preamble whose first element is
    in group 0002 or 0008 (what pydicom reads with ``force=True``); False for anything else and
    for files that cannot be opened."""
    try:
        with open(path, "rb", buffering=0) as fh:
            return _dicom_head(fh.read(132))
    except OSError:
        return False


def require_dicom(path: str | os.PathLike) -> None:
    """Raise HeaderError("not_dicom", NOT_DICOM) unless looks_like_dicom(path)."""
    if not looks_like_dicom(path):
        raise HeaderError("not_dicom", NOT_DICOM)


_WANTED = set(_TAGS) | {0x00080005, 0x00189087, 0x00189089, 0x00041220}


def read_header(path: str, fast: bool = True) -> Instance:
    """The header facts of one DICOM file, read without pixel data (``fast``: with the struct
    reader of header.py, falling back to pydicom; False: with pydicom). Raises HeaderError."""
    try:
        with open(path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if not _dicom_head(fh.read(132)):
                raise HeaderError("not_dicom", NOT_DICOM)
            fh.seek(0)
            try:
                if not fast:
                    raise Fallback("pydicom asked for")
                values, meta, syntax, offset = read_fast(fh, size, _WANTED)
                fields = FastFields(values, meta, syntax)
                if offset is None:
                    offset, pixel_element = size, b""
                else:
                    fh.seek(offset)
                    pixel_element = fh.read(12)
            except Fallback:
                fh.seek(0)
                fields, offset, pixel_element = _read_pydicom(fh, size)
            return _instance(path, fields, offset, size, pixel_element)
    except HeaderError:
        raise
    except OSError as exc:
        raise HeaderError("unreadable", f"cannot read ({type(exc).__name__})") from None
    except Exception as exc:  # a damaged header can raise nearly anything inside a parser
        raise HeaderError("unreadable", type(exc).__name__) from None


def _read_pydicom(fh, size: int):
    import io

    import pydicom

    reader = io.BufferedReader(fh, buffer_size=4096)  # a small buffer: little pixel data is read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warnings may quote element values
        ds = pydicom.dcmread(reader, stop_before_pixels=True, force=True, specific_tags=list(_WANTED))
    offset = reader.tell()
    pixel_element = reader.read(12) if offset < size else b""
    return PydicomFields(ds), offset, pixel_element


def _num(value, cast=float):
    try:
        if value is None or value == "":
            return None
        return cast(value)
    except (TypeError, ValueError):
        return None


def _first_text(fields, tag: int, cast=float):
    text = fields.text(tag)
    if not text:
        return None
    return _num(text.split("\\")[0].strip(), cast)


def _texts(fields, tag: int) -> list[str]:
    text = fields.text(tag)
    return [t.strip() for t in text.split("\\")] if text else []


def _instance(path: str, f, offset: int, size: int, pixel_element: bytes) -> Instance:
    sop_class = f.text(0x00080016) or f.meta_text(0x00020002)
    if sop_class == DICOMDIR_CLASS or f.meta_text(0x00020002) == DICOMDIR_CLASS or f.has(0x00041220):
        raise HeaderError("dicomdir")
    study_uid = f.text(0x0020000D)
    series_uid = f.text(0x0020000E)
    if not study_uid or not series_uid:
        raise HeaderError("unreadable", "no Study/Series Instance UID")
    syntax = f.syntax
    inst = Instance(
        path=path, study_uid=study_uid, series_uid=series_uid,
        sop_uid=f.text(0x00080018) or f.meta_text(0x00020003),
        sop_class=sop_class, modality=f.text(0x00080060).upper(),
        series_number=_first_text(f, 0x00200011, int), description=f.label(0x0008103E),
        image_type=tuple(v.upper() for v in _texts(f, 0x00080008)),
        instance_number=_first_text(f, 0x00200013, int), accession=f.label(0x00080050),
        transfer_syntax=syntax,
    )
    inst.rows = f.us(0x00280010)
    inst.cols = f.us(0x00280011)
    inst.frames = _first_text(f, 0x00280008, int) or 1
    inst.samples = f.us(0x00280002) or 1
    inst.bits_allocated = f.us(0x00280100) or 16
    inst.bits_stored = f.us(0x00280101) or inst.bits_allocated
    inst.signed = bool(f.us(0x00280103))
    inst.photometric = f.text(0x00280004)
    inst.facts = _facts(f)
    _geometry(inst, f)
    # pixel data: remember where native values start (the element header is 8 or 12 bytes)
    inst.file_size = size
    if len(pixel_element) >= 8 and pixel_element[:4] == b"\xe0\x7f\x10\x00":
        implicit = syntax == "1.2.840.10008.1.2"
        length = int.from_bytes(pixel_element[4:8] if implicit else pixel_element[8:12], "little")
        if length == 0xFFFFFFFF:
            inst.pixel_state = "encapsulated"
        elif syntax in NATIVE_SYNTAXES:
            inst.pixel_offset, inst.pixel_length = offset + (8 if implicit else 12), length
            inst.pixel_state = "native" if inst.pixel_offset + length <= size else "short"
        else:
            inst.pixel_state = "other"
    elif syntax == DEFLATED or (offset < size and syntax not in NATIVE_SYNTAXES):
        inst.pixel_state = "other"  # deflated: file positions say nothing about the inflated data
    if syntax == DEFLATED and inst.rows:
        inst.pixel_state = "other"
    return inst


_FACT_NUMBERS = {0x00180080: "repetition_time", 0x00180081: "echo_time", 0x00180082: "inversion_time",
                 0x00181314: "flip_angle", 0x00180087: "field_strength", 0x00180060: "kvp",
                 0x00180050: "slice_thickness", 0x00180088: "spacing_between_slices"}
_FACT_TEXTS = {0x00180020: "scanning_sequence", 0x00180021: "sequence_variant", 0x00180024: "sequence_name",
               0x00180010: "contrast_agent", 0x00181210: "kernel", 0x00180015: "body_part", 0x00181030: "protocol",
               0x00081090: "scanner_model", 0x00080070: "manufacturer"}


def _facts(f) -> dict:
    """Non-identifying acquisition facts worth keeping (sequence hints, CT technique)."""
    out = {}
    for tag, name in _FACT_NUMBERS.items():
        v = _first_text(f, tag)
        if v is not None and math.isfinite(v):
            out[name] = v
    for tag, name in _FACT_TEXTS.items():
        v = f.label(tag)
        if v:
            out[name] = v
    return out


def _volume_key(f) -> tuple:
    """What tells apart images at the same slice position (time, b-value, gradient, echo...)."""
    bval = f.fd(0x00189087)
    grad = f.fd(0x00189089, 3)
    return (
        _first_text(f, 0x00200100, int) or 0,
        _first_text(f, 0x00181060) or 0.0,
        (bval[0] if bval else 0.0) or 0.0,
        tuple(round(v, 4) for v in grad) if grad else (),
        _first_text(f, 0x00180086, int) or 0,
        _first_text(f, 0x00200012, int) or 0,
    )


def _geometry(inst: Instance, f) -> None:
    """Positions/orientations/rescale per frame, from the plain header or the functional groups."""
    slope = _first_text(f, 0x00281053)
    slope = 1.0 if slope is None else slope
    intercept = _first_text(f, 0x00281052) or 0.0
    position = _floats(_texts(f, 0x00200032), 3)
    orientation = _floats(_texts(f, 0x00200037), 6)
    spacing = _floats(_texts(f, 0x00280030), 2)
    key = _volume_key(f)
    ds = getattr(f, "ds", None)  # functional groups are only read through pydicom
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") if ds is not None and 0x52009230 in ds else None
    shared = ds.get("SharedFunctionalGroupsSequence") if ds is not None and 0x52009229 in ds else None
    if per_frame is not None and len(per_frame) > 0:
        shared = shared[0] if shared else None

        def pick(item, seq: str, attr: str):
            for source in (item, shared):
                if source is not None and seq in source and len(source[seq].value) > 0:
                    value = source[seq].value[0].get(attr)
                    if value is not None:
                        return value
            return None

        for item in per_frame:
            inst.positions.append(_floats(pick(item, "PlanePositionSequence", "ImagePositionPatient"), 3))
            inst.orientations.append(_floats(pick(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6))
            inst.slopes.append(_num(pick(item, "PixelValueTransformationSequence", "RescaleSlope")) or slope)
            inst.intercepts.append(_num(pick(item, "PixelValueTransformationSequence", "RescaleIntercept")) or intercept)
            temporal = _num(pick(item, "FrameContentSequence", "TemporalPositionIndex"), int) or 0
            bval = _num(pick(item, "MRDiffusionSequence", "DiffusionBValue")) or 0.0
            echo = _num(pick(item, "MREchoSequence", "EffectiveEchoTime")) or 0.0
            inst.volume_keys.append((temporal, 0.0, bval, (), echo, 0))
        first = per_frame[0]
        spacing = _floats(pick(first, "PixelMeasuresSequence", "PixelSpacing"), 2) or spacing
        thickness = _num(pick(first, "PixelMeasuresSequence", "SliceThickness"))
        if thickness:
            inst.facts["slice_thickness"] = thickness
        inst.frames = len(per_frame)
    elif inst.frames > 1:
        # legacy multi-frame: frames stacked along the normal, SpacingBetweenSlices apart
        step = _first_text(f, 0x00180088) or _first_text(f, 0x00180050)
        if position is not None and orientation is not None and step:
            normal = np.cross(orientation[:3], orientation[3:])
            inst.positions = [tuple(np.asarray(position) + k * step * normal) for k in range(inst.frames)]
        else:
            inst.positions = [None] * inst.frames
        inst.orientations = [orientation] * inst.frames
        inst.slopes = [slope] * inst.frames
        inst.intercepts = [intercept] * inst.frames
        inst.volume_keys = [key] * inst.frames
    else:
        inst.positions, inst.orientations = [position], [orientation]
        inst.slopes, inst.intercepts, inst.volume_keys = [slope], [intercept], [key]
    inst.pixel_spacing = spacing


# -- series selection and geometry -----------------------------------------------------------------


@dataclass
class VolumePlan:
    """One volume to assemble: its slices (instance, frame) in order along the normal, and its
    geometry. ``fill`` lists grid slices made by interpolation: (grid index, lower source slice,
    upper source slice, weight of the upper)."""

    scan_id: str
    series_uid: str
    modality: str
    description: str
    series_number: int | None
    slices: list  # [(Instance, frame)] one per real grid slice, in grid order
    grid_index: list  # grid slice index of each entry of ``slices``
    n_grid: int
    origin: tuple
    spacing: tuple
    direction: tuple
    header: dict
    fill: list = field(default_factory=list)

    @property
    def files(self) -> list[str]:
        seen, out = set(), []
        for inst, _ in self.slices:
            if inst.path not in seen:
                seen.add(inst.path)
                out.append(inst.path)
        return out


def _series_skip(first: Instance, reason: str, detail: str, files: Sequence[str], kind: str = "series") -> Skipped:
    return Skipped(kind, reason, detail, first.series_number, first.description, first.series_uid, list(files))


def _is_localizer(inst: Instance) -> str | None:
    if any(t in ("LOCALIZER", "SCOUT") for t in inst.image_type):
        return f"ImageType {inst.image_type[-1] if inst.image_type[-1] in ('LOCALIZER', 'SCOUT') else 'LOCALIZER'}"
    desc = inst.description.lower()
    for word in LOCALIZER_WORDS:
        if word in desc:
            return f"description '{inst.description}'"
    return None


def _non_image(inst: Instance) -> str | None:
    for prefix, name in NON_IMAGE_CLASSES.items():
        if inst.sop_class.startswith(prefix):
            return name
    if inst.modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[inst.modality]
    if not inst.rows or not inst.cols:
        return f"no pixel data (modality {inst.modality or '?'})"
    return None


def _truncation(inst: Instance) -> str | None:
    """Why a file cannot give pixels from its header alone ('truncated' detail), else None."""
    if inst.pixel_state == "none" or not inst.rows or not inst.cols:
        return "no pixel data"
    if inst.pixel_state == "short":
        return f"file ends at byte {inst.file_size} inside its pixel data"
    return None


def _copy_damage(inst: Instance) -> tuple[str, str] | None:
    """(reason, detail) when a file's pixels are incomplete or do not decode, else None."""
    cut = _truncation(inst)
    if cut is not None:
        return "truncated", cut
    try:
        read_frames(inst)
    except AssemblyError as exc:
        return exc.reason, exc.detail
    except Exception as exc:  # noqa: BLE001 - any decoder failure means this copy is damaged
        return "undecodable", type(exc).__name__
    return None


def _copy_geometry(inst: Instance) -> tuple:
    """What places a file in its series: orientation, size, spacing, and position with volume key."""
    ori = tuple(round(v, 3) for v in inst.orientations[0]) if inst.orientations and inst.orientations[0] else None
    pos = tuple(round(v, 2) for v in inst.positions[0]) if inst.positions and inst.positions[0] else None
    spacing = tuple(round(v, 4) for v in inst.pixel_spacing) if inst.pixel_spacing else None
    key = inst.volume_keys[0] if inst.volume_keys else ()
    return (ori, inst.rows, inst.cols, spacing), (pos, key)


def _fits(inst: Instance, frame: tuple | None, taken: set) -> bool:
    """Whether ``inst`` has the series' usual frame (orientation, size, spacing) at a free position."""
    own_frame, place = _copy_geometry(inst)
    return own_frame == frame and place not in taken


def resolve_copies(instances: list[Instance]) -> tuple[list[Instance], list[Skipped], Skipped | None]:
    """One file per SOPInstanceUID, chosen by content, never by reading order.

    instances: the files of one series (any order). Among files sharing a SOPInstanceUID, copies
    whose pixel data is incomplete or does not decode lose to an intact copy; identical intact
    copies keep the first path in sorted order; intact copies with different pixels keep the one
    copy whose geometry fits the rest of the series (its orientation, size and spacing, and a
    position no other instance holds), if exactly one does.
    Returns (instances to use, in the input's order; Skipped for each copy not used, naming the
    kept copy in ``kept``; a series-level Skipped "conflict" when the choice is ambiguous, else None).
    Only instances with copies have their pixels read here.
    """
    by_uid: dict[str, list[Instance]] = {}
    for inst in instances:
        by_uid.setdefault(inst.sop_uid or inst.path, []).append(inst)
    if all(len(c) == 1 for c in by_uid.values()):
        return instances, [], None
    singles = [c[0] for c in by_uid.values() if len(c) == 1]
    frame_of = {}  # the series without duplicated instances: what a conflicting copy must fit
    taken = set()
    for inst in singles:
        frame, place = _copy_geometry(inst)
        frame_of[frame] = frame_of.get(frame, 0) + 1
        taken.add(place)
    usual = max(frame_of, key=frame_of.get) if frame_of else None
    skipped: list[Skipped] = []
    drop: set[int] = set()

    def skip(inst: Instance, reason: str, detail: str, kept: Instance | None) -> None:
        drop.add(id(inst))
        skipped.append(Skipped("file", reason, detail, inst.series_number, inst.description, inst.series_uid,
                               [inst.path], kept.path if kept is not None else ""))

    for copies in by_uid.values():
        if len(copies) == 1:
            continue
        copies = sorted(copies, key=lambda i: i.path)
        intact, pixels = [], []
        damaged = []
        for inst in copies:
            why = _copy_damage(inst)
            if why is None:
                values = read_frames(inst)
                for k, seen in enumerate(pixels):  # identical copies count once
                    if seen.shape == values.shape and np.array_equal(seen, values):
                        intact[k].append(inst)
                        break
                else:
                    intact.append([inst])
                    pixels.append(values)
            else:
                damaged.append((inst, why))
        del pixels
        if not intact:  # no intact copy anywhere: keep the first, assembly reports it as damaged
            keep = copies[0]
            for inst, why in damaged[1:]:
                skip(inst, why[0], f"{why[1]}; another copy is damaged too", keep)
            drop.discard(id(keep))
            continue
        if len(intact) > 1:
            fits = [g for g in intact if _fits(g[0], usual, taken)]
            if len(fits) != 1:
                files = sorted(i.path for g in intact for i in g)
                first = copies[0]
                return [], skipped, Skipped(
                    "series", "conflict", f"{len(intact)} intact copies of one instance differ in their pixels "
                    "and none alone fits the series' geometry", first.series_number, first.description,
                    first.series_uid, files)
            chosen = fits[0]
            for g in intact:
                if g is not chosen:
                    for inst in g:
                        skip(inst, "conflict", "intact copy with other pixels, not fitting the series' geometry", chosen[0])
        else:
            chosen = intact[0]
        keep = chosen[0]
        for inst in chosen[1:]:
            skip(inst, "duplicate", "identical copy of the instance", keep)
        for inst, why in damaged:
            skip(inst, why[0], why[1], keep)
    return [i for i in instances if id(i) not in drop], skipped, None


def plan_series(instances: list[Instance], options: IngestOptions) -> tuple[list[VolumePlan], list[Skipped]]:
    """Decide what one series (instances sharing a SeriesInstanceUID) becomes: volumes to assemble,
    and skipped parts with reasons."""
    instances = sorted(instances, key=lambda i: (i.instance_number or 0, i.path))
    first = instances[0]
    files = [i.path for i in instances]
    why = _non_image(first)
    if why:
        return [], [_series_skip(first, "not_image", why, sorted(files))]
    # several files of one SOP instance: the intact copy wins, whatever the reading order
    instances, skipped, conflict = resolve_copies(instances)
    if conflict is not None:
        return [], skipped + [conflict]
    kept = []
    for inst in instances:
        detail = _truncation(inst)
        if detail is not None:
            skipped.append(Skipped("file", "truncated", detail, inst.series_number, inst.description, inst.series_uid, [inst.path]))
            continue
        kept.append(inst)
    if not kept:
        return [], skipped
    instances = kept
    first = instances[0]
    files = sorted(i.path for i in instances)
    if first.sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
        return [], [_series_skip(first, "secondary_capture", f"SOP class {first.sop_class}", files)]
    why = _is_localizer(first)
    if why:
        return [], [_series_skip(first, "localizer", why, files)]
    if not options.keep_derived and first.image_type[:1] == ("DERIVED",):
        return [], [_series_skip(first, "derived", "ImageType " + "\\".join(first.image_type), files)]
    if first.samples != 1:
        return [], [_series_skip(first, "colour", f"{first.samples} samples per pixel, {first.photometric}", files)]

    # every frame is a slice: (instance, frame, position, orientation)
    slices = [(inst, f) for inst in instances for f in range(inst.frames)]
    no_geometry = [s for s in slices if _pos(s) is None or _ori(s) is None or s[0].pixel_spacing is None]
    if no_geometry:
        if len(no_geometry) == len(slices):
            return [], skipped + [_series_skip(first, "missing_geometry", "no ImagePositionPatient/ImageOrientationPatient/PixelSpacing", files)]
        skipped.append(_series_skip(first, "missing_geometry", f"{len(no_geometry)} of {len(slices)} images lack position or orientation",
                                    sorted({s[0].path for s in no_geometry}), kind="volume"))
        bad = {id(s[0]) * 100003 + s[1] for s in no_geometry}
        slices = [s for s in slices if id(s[0]) * 100003 + s[1] not in bad]

    # stacks: same orientation, image size and pixel spacing
    stacks: dict[tuple, list] = {}
    for s in slices:
        inst = s[0]
        key = (tuple(round(v, 3) for v in _ori(s)), inst.rows, inst.cols, tuple(round(v, 4) for v in inst.pixel_spacing))
        stacks.setdefault(key, []).append(s)
    groups = sorted(stacks.values(), key=len, reverse=True)
    usable = [g for g in groups if len(g) >= options.min_slices]
    if len(groups) > 1:
        if not usable:
            return [], skipped + [_series_skip(first, "mixed_orientation", f"{len(groups)} orientations/sizes with at most {len(groups[0])} images each", files)]
        for g in groups:
            if len(g) < options.min_slices:
                skipped.append(_series_skip(first, "mixed_orientation", f"{len(g)} image(s) in another orientation or size than the rest",
                                            sorted({s[0].path for s in g}), kind="volume"))
    groups = usable or groups

    volumes: list[tuple[list, str]] = []  # (slices, label)
    for g in groups:
        split, more = _split_repeats(g, first, options)
        skipped += more
        volumes += split
    plans = []
    for slices_v, label in volumes:
        plan, why = _plan_volume(slices_v, first, options)
        if plan is None:
            skipped.append(_series_skip(first, why[0], why[1], sorted({s[0].path for s in slices_v}),
                                        kind="series" if len(volumes) == 1 else "volume"))
            continue
        if label:
            plan.header["volume"] = label
        plans.append(plan)
    if len(plans) > 1:
        for k, plan in enumerate(plans, start=1):
            plan.scan_id = f"{first.series_uid}_{k}"
    return plans, skipped


def _pos(s):
    return s[0].positions[s[1]] if s[1] < len(s[0].positions) else None


def _ori(s):
    return s[0].orientations[s[1]] if s[1] < len(s[0].orientations) else None


def _normal(orientation) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))


def _split_repeats(group: list, first: Instance, options: IngestOptions) -> tuple[list, list]:
    """Images at repeated positions (time series, diffusion, echoes) -> one list per volume."""
    normal = _normal(_ori(group[0]))
    proj = np.array([float(np.dot(normal, _pos(s))) for s in group])
    order = np.argsort(proj, kind="stable")
    # cluster projections closer than 0.01 mm: one cluster = one slice position
    clusters: list[list] = []
    last = None
    for i in order:
        if last is None or proj[i] - last > 0.01:
            clusters.append([])
        clusters[-1].append(group[i])
        last = proj[i]
    counts = {len(c) for c in clusters}
    if counts == {1}:
        return [([c[0] for c in clusters], "")], []
    files = sorted({s[0].path for s in group})
    if len(counts) > 1:
        return [], [_series_skip(first, "unequal_repeats", f"{min(counts)} to {max(counts)} images per position over {len(clusters)} positions", files)]
    k = counts.pop()

    def rank_key(s):
        inst, f = s
        return (inst.volume_keys[f] if f < len(inst.volume_keys) else (), inst.instance_number or 0, inst.path, f)

    for c in clusters:
        c.sort(key=rank_key)
    volumes = []
    for t in range(k):
        sl = [c[t] for c in clusters]
        inst, f = sl[0]
        vkey = inst.volume_keys[f] if f < len(inst.volume_keys) else ()
        volumes.append((sl, _volume_label(t, k, vkey)))
    chosen = list(range(k))
    if options.repeated == "first":
        chosen = [0]
    elif options.repeated == "last":
        chosen = [k - 1]
    elif k > options.max_volumes:
        chosen = list(range(options.max_volumes))
    skipped = []
    dropped = [t for t in range(k) if t not in chosen]
    if dropped:
        why = f"{k} images per position; kept volume(s) {_ranges(chosen)} by option repeated={options.repeated!r}" + (
            f", max_volumes={options.max_volumes}" if options.repeated == "split" else "")
        skipped.append(_series_skip(first, "volume_not_selected", why, sorted({s[0].path for t in dropped for s in volumes[t][0]}), kind="volume"))
    log.info("series %s: %d images per slice position, %d volume(s) kept", first.series_number, k, len(chosen))
    return [volumes[t] for t in chosen], skipped


def _ranges(idx: list[int]) -> str:
    return f"{idx[0] + 1}" if len(idx) == 1 else f"{idx[0] + 1}-{idx[-1] + 1}"


def _volume_label(t: int, k: int, vkey: tuple) -> str:
    parts = [f"{t + 1}/{k}"]
    if vkey and vkey[2]:
        parts.append(f"b={vkey[2]:g}")
    if vkey and vkey[0]:
        parts.append(f"time {vkey[0]}")
    return " ".join(parts)


def _plan_volume(slices: list, first: Instance, options: IngestOptions):
    """Geometry and gap filling of one stack of distinct positions; (None, (reason, detail)) when
    the stack is not a regular volume."""
    n = len(slices)
    if n < options.min_slices:
        return None, ("too_few_slices", f"{n} < {options.min_slices}")
    inst0 = slices[0][0]
    ori = _ori(slices[0])
    row, col = np.asarray(ori[:3]), np.asarray(ori[3:])
    normal = np.cross(row, col)
    pos = np.array([_pos(s) for s in slices], dtype=np.float64)
    if n == 1:  # only with min_slices=1: a single image, its thickness as the slice spacing
        header = _header(first)
        header["slices"] = 1
        dz = first.facts.get("spacing_between_slices") or first.facts.get("slice_thickness") or 1.0
        direction = (row[0], col[0], normal[0], row[1], col[1], normal[1], row[2], col[2], normal[2])
        return VolumePlan(first.series_uid, first.series_uid, first.modality or "OT", first.description, first.series_number,
                          slices, [0], 1, tuple(float(v) for v in pos[0]),
                          (float(inst0.pixel_spacing[1]), float(inst0.pixel_spacing[0]), float(abs(dz))),
                          tuple(float(v) for v in direction), header), None
    proj = pos @ normal
    steps = np.diff(proj)
    step = float(np.median(steps))
    if step <= 1e-6:
        return None, ("inconsistent_spacing", "slices do not advance along the normal")
    ratio = steps / step
    whole = np.rint(ratio)
    tol = np.where(whole > 1, 0.05, max(0.01 / step, 0.01))  # 1% of a step (at least 0.01 mm), 5% across a gap
    if np.any(np.abs(ratio - whole) > tol) or np.any(whole < 1):
        return None, ("inconsistent_spacing", f"slice steps from {steps.min():.3g} to {steps.max():.3g} mm")
    gaps = whole.astype(int) - 1
    if gaps.max(initial=0) > options.max_gap:
        at = int(np.argmax(gaps))
        return None, ("inconsistent_spacing", f"{gaps[at]} missing slices after slice {at + 1} (max_gap={options.max_gap})")
    # slices on one line (a gantry tilt shears the stack, which is allowed; scattered stacks are not)
    line = pos[-1] - pos[0]
    along = (pos - pos[0]) @ line / max(float(line @ line), 1e-12)
    off = pos - pos[0] - along[:, None] * line[None, :]
    if np.abs(off).max() > max(0.05, 0.05 * min(inst0.pixel_spacing)):
        return None, ("inconsistent_spacing", "slice positions are not on one line")
    grid_index = np.concatenate([[0], np.cumsum(whole.astype(int))]).tolist()
    n_grid = grid_index[-1] + 1
    fill = []
    for i, g in enumerate(gaps):
        for j in range(1, g + 1):
            fill.append((grid_index[i] + j, i, i + 1, j / (g + 1)))
    dz = float(np.linalg.norm(line)) / (n_grid - 1) if n_grid > 1 else (first.facts.get("slice_thickness") or 1.0)
    header = _header(first)
    header["slices"] = n_grid
    tilt = math.degrees(math.acos(min(1.0, abs(float(line @ normal)) / max(float(np.linalg.norm(line)), 1e-12)))) if n_grid > 1 else 0.0
    if tilt > 0.05:
        header["gantry_tilt_deg"] = round(tilt, 3)
    if fill:
        header["interpolated_slices"] = [f[0] for f in fill]
        log.info("series %s: %d missing slice(s) filled by interpolation", first.series_number, len(fill))
    direction = (row[0], col[0], normal[0], row[1], col[1], normal[1], row[2], col[2], normal[2])
    spacing = (inst0.pixel_spacing[1], inst0.pixel_spacing[0], dz)
    plan = VolumePlan(first.series_uid, first.series_uid, first.modality or "OT", first.description, first.series_number,
                      slices, grid_index, n_grid, tuple(float(v) for v in pos[0]), tuple(float(v) for v in spacing),
                      tuple(float(v) for v in direction), header, fill)
    return plan, None


def _header(inst: Instance) -> dict:
    header = {"series_number": inst.series_number, "image_type": list(inst.image_type), "sop_class": inst.sop_class}
    header.update({k: v for k, v in inst.facts.items() if not k.startswith("_")})
    return header


# -- pixels ---------------------------------------------------------------------------------------


class AssemblyError(Exception):
    def __init__(self, reason: str, detail: str, path: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.path = reason, detail, path


def _dtype(inst: Instance) -> np.dtype:
    if inst.bits_allocated not in (8, 16, 32):
        raise AssemblyError("undecodable", f"{inst.bits_allocated} bits allocated", inst.path)
    kind = "i" if inst.signed else "u"
    return np.dtype(f"<{kind}{inst.bits_allocated // 8}")


def read_frames(inst: Instance) -> np.ndarray:
    """The stored pixel values of one file: [frames, rows, cols] (no rescale)."""
    dtype = _dtype(inst)
    per_frame = inst.rows * inst.cols
    if inst.pixel_state in ("none", "short"):
        raise AssemblyError("truncated", "the file ends before its pixel data does", inst.path)
    if inst.pixel_state == "native":
        count = per_frame * inst.frames
        if inst.pixel_length < count * dtype.itemsize:
            raise AssemblyError("truncated", f"pixel data holds {inst.pixel_length} bytes, {count * dtype.itemsize} expected", inst.path)
        with open(inst.path, "rb") as fh:
            fh.seek(inst.pixel_offset - (8 if inst.transfer_syntax == "1.2.840.10008.1.2" else 12))
            if fh.read(4) != b"\xe0\x7f\x10\x00":
                raise AssemblyError("undecodable", "the file changed since its header was read", inst.path)
            fh.seek(inst.pixel_offset)
            arr = np.fromfile(fh, dtype=dtype, count=count)
        if arr.size < count:
            raise AssemblyError("truncated", f"{arr.size * dtype.itemsize} of {count * dtype.itemsize} pixel bytes present", inst.path)
        arr = arr.reshape(inst.frames, inst.rows, inst.cols)
    else:
        arr = _decode(inst)
    if inst.bits_stored < inst.bits_allocated and inst.signed:
        shift = inst.bits_allocated - inst.bits_stored  # sign-extend values stored in fewer bits
        arr = (arr << shift) >> shift
    return arr


def _read_into(inst: Instance, out: np.ndarray) -> None:
    """Native single-frame pixels read directly into ``out`` (a C-contiguous [rows, cols] view)."""
    need = out.nbytes
    if inst.pixel_length < need:
        raise AssemblyError("truncated", f"pixel data holds {inst.pixel_length} bytes, {need} expected", inst.path)
    with open(inst.path, "rb", buffering=0) as fh:
        fh.seek(inst.pixel_offset - (8 if inst.transfer_syntax == "1.2.840.10008.1.2" else 12))
        if fh.read(4) != b"\xe0\x7f\x10\x00":
            raise AssemblyError("undecodable", "the file changed since its header was read", inst.path)
        fh.seek(inst.pixel_offset)
        got = fh.readinto(memoryview(out).cast("B"))
    if got != need:
        raise AssemblyError("truncated", f"{got} of {need} pixel bytes present", inst.path)


def _decode(inst: Instance) -> np.ndarray:
    """Compressed or unusual encodings: pydicom's decoders, then SimpleITK's (GDCM)."""
    import pydicom

    errors = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(inst.path, force=True)
            arr = ds.pixel_array
        return np.asarray(arr).reshape(inst.frames, inst.rows, inst.cols)
    except Exception as exc:  # noqa: BLE001 - any decoder failure falls through to GDCM
        errors.append(type(exc).__name__)
    try:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(inst.path)
        reader.SetImageIO("GDCMImageIO")
        img = reader.Execute()
        arr = sitk.GetArrayFromImage(img)
        # GDCM applies rescale itself; undo it so every path returns stored values
        slope, intercept = inst.slopes[0], inst.intercepts[0]
        if slope != 1.0 or intercept != 0.0:
            arr = np.rint((arr.astype(np.float64) - intercept) / slope)
        return arr.reshape(inst.frames, inst.rows, inst.cols).astype(_dtype(inst))
    except Exception as exc:  # noqa: BLE001
        errors.append(type(exc).__name__)
    raise AssemblyError("undecodable", f"transfer syntax {inst.transfer_syntax}; decoders failed: {', '.join(errors)}", inst.path)


def assemble(plan: VolumePlan):
    """Read the pixels of a planned volume: a SimpleITK image [x=cols, y=rows, z=slices] with the
    plan's geometry and rescale slope/intercept applied (int16/int32 when the rescaled values are
    whole numbers, else float32). Raises AssemblyError naming the first bad file."""
    import SimpleITK as sitk

    inst0 = plan.slices[0][0]
    slopes = np.array([s[0].slopes[s[1]] for s in plan.slices], dtype=np.float64)
    intercepts = np.array([s[0].intercepts[s[1]] for s in plan.slices], dtype=np.float64)
    integral = bool(np.all(slopes == np.rint(slopes)) and np.all(intercepts == np.rint(intercepts)))
    if integral:
        # the smallest integer type that holds every possible rescaled value
        bits = inst0.bits_stored
        lo_s, hi_s = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if inst0.signed else (0, 2 ** bits - 1)
        ends = np.concatenate([lo_s * slopes + intercepts, hi_s * slopes + intercepts])
        # int16 unless a value outside it is possible and then actually met (the buffer grows once)
        certain = ends.min() >= -32768 and ends.max() <= 32767
        dtype = np.int16
    else:
        certain, dtype = True, np.float32
    stored = _assemble_uniform(plan, slopes, intercepts, integral)
    if stored is None:
        stored = _assemble_per_slice(plan, slopes, intercepts, integral, certain, dtype)
    volume = stored
    if plan.fill:
        volume = np.empty((plan.n_grid,) + stored.shape[1:], dtype=stored.dtype)
        volume[plan.grid_index] = stored
        for g, a, b, w in plan.fill:  # a missing slice: linear between its two neighbours
            mix = (1 - w) * stored[a].astype(np.float32) + w * stored[b].astype(np.float32)
            volume[g] = np.rint(mix) if integral else mix
    image = sitk.GetImageFromArray(volume)
    image.SetOrigin(plan.origin)
    image.SetSpacing(plan.spacing)
    image.SetDirection(plan.direction)
    return image


def _assemble_uniform(plan: VolumePlan, slopes, intercepts, integral: bool) -> np.ndarray | None:
    """The common case, fast: single-frame native files sharing one rescale. Pixels are read
    straight into one buffer and rescaled in one vectorised step. None when it does not apply."""
    inst0 = plan.slices[0][0]
    if not (np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0])):
        return None
    for inst, _ in plan.slices:
        if (inst.frames != 1 or inst.pixel_state != "native" or inst.bits_stored != inst.bits_allocated
                or (inst.rows, inst.cols) != (inst0.rows, inst0.cols) or inst.signed != inst0.signed
                or inst.bits_allocated != inst0.bits_allocated):
            return None
    raw = np.empty((len(plan.slices), inst0.rows, inst0.cols), dtype=_dtype(inst0))
    for i, (inst, _) in enumerate(plan.slices):
        _read_into(inst, raw[i])
    slope, intercept = float(slopes[0]), float(intercepts[0])
    if slope == 1.0 and intercept == 0.0:
        return raw  # stored values are the values (uint16 stays uint16, as SimpleITK reads it)
    if not integral:
        out = raw.astype(np.float32)
        out *= np.float32(slope)
        out += np.float32(intercept)
        return out
    def fits_int16(lo: int, hi: int) -> bool:
        ends = (lo * slope + intercept, hi * slope + intercept)
        return min(ends) >= -32768 and max(ends) <= 32767 and (inst0.signed or hi <= 32767)

    bits = inst0.bits_stored
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if inst0.signed else (0, 2 ** bits - 1)
    if raw.itemsize == 2 and slope == 1.0:
        # CT's usual case (12 bits stored, intercept -1024): add in place on an int16 view of the
        # buffer, one pass and no second volume; the stored bits, else the actual values, must fit
        if not fits_int16(lo, hi) and raw.size:
            lo, hi = int(raw.min()), int(raw.max())
        if fits_int16(lo, hi):
            view = raw.view(np.int16)
            view += np.int16(intercept)
            return view
    lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
    ends = (lo * slope + intercept, hi * slope + intercept)
    dtype = np.int16 if min(ends) >= -32768 and max(ends) <= 32767 else np.int32
    out = np.empty(raw.shape, dtype=dtype)
    if slope == 1.0:
        np.add(raw, int(intercept), out=out, dtype=np.int64 if dtype == np.int32 else np.int32, casting="unsafe")
    else:
        tmp = raw.astype(np.int64)
        tmp *= int(slope)
        tmp += int(intercept)
        out[...] = tmp
    return out


def _assemble_per_slice(plan: VolumePlan, slopes, intercepts, integral: bool, certain: bool, dtype) -> np.ndarray:
    """Any mix of frames, encodings and per-slice rescales, one slice at a time."""
    inst0 = plan.slices[0][0]
    stored = np.empty((len(plan.slices), inst0.rows, inst0.cols), dtype=dtype)
    cache: dict[str, np.ndarray] = {}  # multi-frame files of this volume, read once each
    for i, (inst, frame) in enumerate(plan.slices):
        if (inst.rows, inst.cols) != (inst0.rows, inst0.cols):
            raise AssemblyError("mixed_orientation", "image size changes within the volume", inst.path)
        if (inst.frames == 1 and inst.pixel_state == "native" and slopes[i] == 1.0 and intercepts[i] == 0.0
                and inst.bits_stored == inst.bits_allocated and stored.dtype == _dtype(inst)):
            _read_into(inst, stored[i])  # straight from the file into the volume, no copy
            continue
        if inst.frames > 1:
            if inst.path not in cache:
                cache[inst.path] = read_frames(inst)
            values = cache[inst.path][frame]
        else:
            values = read_frames(inst)[0]
        if integral:
            if slopes[i] != 1.0 or intercepts[i] != 0.0 or values.dtype.itemsize > 2 or (not certain and values.dtype == np.uint16):
                wide = np.int32 if certain else np.int64  # int32 cannot overflow when the range is known to fit
                values = values.astype(wide)
                if slopes[i] != 1.0:
                    values *= int(slopes[i])
                values += int(intercepts[i])
            if not certain and stored.dtype == np.int16 and values.size and (values.min() < -32768 or values.max() > 32767):
                stored = stored.astype(np.int32)
            stored[i] = values
        else:
            stored[i] = values.astype(np.float32) * np.float32(slopes[i]) + np.float32(intercepts[i])
    cache.clear()
    return stored
