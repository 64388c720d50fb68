"""DICOM series written with pydicom for the ingestion tests: known geometry, known voxels, and the
awkward cases of real archives (oblique planes, shuffled names, gantry tilt, missing slices,
localisers, SR objects, multi-frame objects, repeated positions, truncated and foreign files).

Every series carries fake patient identifiers (``PATIENT_NAME``, ``PATIENT_ID``, ``BIRTH_DATE``)
so that privacy tests can look for them in every output.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Zyxwhitt^Quorabelle"
PATIENT_ID = "PID-7Q4X9Z"
BIRTH_DATE = "19231107"
ACCESSION = "ACC-55123"

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"


def rotation(ax: float = 0.0, ay: float = 0.0, az: float = 0.0) -> np.ndarray:
    """A 3x3 rotation (degrees about x, then y, then z); its first two columns make an oblique
    ImageOrientationPatient."""
    a, b, c = (math.radians(v) for v in (ax, ay, az))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


AXIAL = np.eye(3)
CORONAL = np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # rows along x, columns along -z
SAGITTAL = np.array([[0.0, 0, -1], [1, 0, 0], [0, -1, 0]])  # rows along y, columns along -z


@dataclass
class WrittenSeries:
    """What a factory call wrote: the files (in slice order, before shuffling of names), the UIDs,
    and the voxels [slices, rows, cols] after rescale, as a correct reader must return them."""

    files: list[Path]
    study_uid: str
    series_uid: str
    volume: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float, float]  # (column spacing x, row spacing y, slice step)
    axes: np.ndarray  # 3x3, columns: row direction, column direction, slice normal
    extra: dict = field(default_factory=dict)


def _base(sop_class: str, modality: str, study_uid: str, series_uid: str, series_number: int,
          description: str, image_type: Sequence[str] | None, transfer_syntax=ExplicitVRLittleEndian) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.7433.1.1"
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian = True
    ds.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.StudyDescription = "research study"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = ACCESSION
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.PatientSex = "O"
    ds.FrameOfReferenceUID = generate_uid(prefix=None, entropy_srcs=[study_uid, "frame of reference"])
    if image_type is not None:
        ds.ImageType = list(image_type)
    return ds


def _pixel_module(ds: Dataset, rows: int, cols: int, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0


def _ds(v: float) -> str:
    return f"{v:.10g}"


def default_values(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Stored values [n, rows, cols]: a slice-dependent ramp plus noise, so that any wrong slice
    order, flip or transposition changes the array."""
    rng = np.random.default_rng(seed)
    k, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
    return (1000 + 37 * k + 3 * r + c + rng.integers(0, 7, size=(n, rows, cols))).astype(np.int32)


def write_series(folder: str | os.PathLike, *, n: int = 12, rows: int = 16, cols: int = 20,
                 pixel_spacing: tuple[float, float] = (0.8, 0.9), step: float = 2.0,
                 axes: np.ndarray = AXIAL, origin: Sequence[float] = (-10.0, -20.0, 30.0),
                 modality: str = "CT", study_uid: str | None = None, series_uid: str | None = None,
                 series_number: int = 1, description: str = "axial", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 slope: float = 1.0, intercept: float = -1024.0, values: np.ndarray | None = None,
                 tilt_deg: float = 0.0, drop: Sequence[int] = (), shuffle: int | None = 0,
                 name: Callable[[int], str] | None = None, signed: bool = False, seed: int = 0,
                 sop_class: str | None = None, transfer_syntax=ExplicitVRLittleEndian,
                 repeats: int = 1, repeat_tag: str = "TemporalPositionIdentifier",
                 instance_numbers: str = "ascending", extra: dict | None = None) -> WrittenSeries:
    """Write one single-frame series into ``folder`` and return what a reader must find.

    axes: 3x3 whose first two columns are the row and column directions (ImageOrientationPatient);
    slices advance along their cross product by ``step`` mm. ``tilt_deg`` shears the stack along the
    column direction (CT gantry tilt). ``drop`` leaves out those slice indices (a missing slice).
    ``shuffle``: seed for random file names (None: names in slice order). ``repeats`` > 1 writes
    that many images at every position (a time series), told apart by ``repeat_tag``.
    ``instance_numbers``: "ascending", "descending" or "random" (readers must not trust them).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    axes = np.asarray(axes, dtype=float)
    row_dir, col_dir = axes[:, 0], axes[:, 1]
    normal = np.cross(row_dir, col_dir)
    total = n * repeats
    if values is None:
        values = default_values(total, rows, cols, seed)
    values = np.asarray(values)
    if values.shape != (total, rows, cols):
        raise ValueError(f"values must be {(total, rows, cols)}, got {values.shape}")
    sop_class = sop_class or (CT_IMAGE if modality == "CT" else MR_IMAGE)
    shear = math.tan(math.radians(tilt_deg)) * step
    positions = [np.asarray(origin, float) + k * step * normal + k * shear * col_dir for k in range(n)]
    rng = random.Random(f"{shuffle}-{series_uid}")  # distinct names for distinct series in one folder
    order = list(range(total))
    numbers = {"ascending": list(range(1, total + 1)), "descending": list(range(total, 0, -1))}.get(instance_numbers)
    if numbers is None:
        numbers = list(range(1, total + 1))
        rng.shuffle(numbers)
    files, kept = [], []
    for idx in order:
        t, k = divmod(idx, n)
        if k in drop:
            continue
        ds = _base(sop_class, modality, study_uid, series_uid, series_number, description, image_type, transfer_syntax)
        _pixel_module(ds, rows, cols, signed)
        ds.InstanceNumber = numbers[idx]
        ds.ImagePositionPatient = [_ds(v) for v in positions[k]]
        ds.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
        ds.SliceThickness = _ds(abs(step))
        if modality == "CT" or slope != 1.0 or intercept != 0.0:
            ds.RescaleSlope = _ds(slope)
            ds.RescaleIntercept = _ds(intercept)
        if modality == "MR":
            ds.RepetitionTime = "2300"
            ds.EchoTime = "2.98"
            ds.MagneticFieldStrength = "3"
        if modality == "CT":
            ds.KVP = "120"
            ds.ConvolutionKernel = "STANDARD"
        if repeats > 1:
            if repeat_tag == "TemporalPositionIdentifier":
                ds.TemporalPositionIdentifier = t + 1
                ds.NumberOfTemporalPositions = repeats
            elif repeat_tag == "DiffusionBValue":
                ds.add_new((0x0018, 0x9087), "FD", float(500 * t))
            elif repeat_tag == "EchoNumbers":
                ds.EchoNumbers = t + 1
            elif repeat_tag == "TriggerTime":
                ds.TriggerTime = str(40 * t)
            else:
                raise ValueError(repeat_tag)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        stored = values[idx]
        ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
        fname = name(idx) if name else (f"{rng.getrandbits(40):010x}" if shuffle is not None else f"IM{idx:05d}")
        path = folder / fname
        ds.save_as(path, write_like_original=False)
        files.append(path)
        kept.append(idx)
    volume = values.astype(np.float64) * slope + intercept
    return WrittenSeries(files, study_uid, series_uid, volume, positions[0],
                         (pixel_spacing[1], pixel_spacing[0], step), np.stack([row_dir, col_dir, normal], axis=1),
                         {"positions": positions, "kept": kept})


def write_multiframe(path: str | os.PathLike, *, n: int = 10, rows: int = 16, cols: int = 20,
                     pixel_spacing=(0.8, 0.9), step: float = 2.0, axes: np.ndarray = AXIAL,
                     origin=(-10.0, -20.0, 30.0), modality: str = "MR", study_uid: str | None = None,
                     series_uid: str | None = None, series_number: int = 5, description: str = "enhanced",
                     slope: float = 1.0, intercept: float = 0.0, frame_order: Sequence[int] | None = None,
                     seed: int = 0) -> WrittenSeries:
    """One enhanced (multi-frame) object: per-frame positions in PerFrameFunctionalGroupsSequence,
    orientation and pixel measures shared. ``frame_order`` stores the slices in that order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    axes = np.asarray(axes, float)
    row_dir, col_dir = axes[:, 0], axes[:, 1]
    normal = np.cross(row_dir, col_dir)
    values = default_values(n, rows, cols, seed)
    order = list(frame_order) if frame_order is not None else list(range(n))
    sop = ENHANCED_MR if modality == "MR" else ENHANCED_CT
    ds = _base(sop, modality, study_uid, series_uid, series_number, description, ("ORIGINAL", "PRIMARY", "AXIAL", "NONE"))
    _pixel_module(ds, rows, cols, signed=False)
    ds.NumberOfFrames = n
    ds.InstanceNumber = 1
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [_ds(v) for v in (*row_dir, *col_dir)]
    measures = Dataset()
    measures.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    measures.SliceThickness = _ds(step)
    measures.SpacingBetweenSlices = _ds(step)
    transform = Dataset()
    transform.RescaleSlope = _ds(slope)
    transform.RescaleIntercept = _ds(intercept)
    transform.RescaleType = "US"
    shared.PlaneOrientationSequence = DicomSequence([orient])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PixelValueTransformationSequence = DicomSequence([transform])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames = []
    positions = [np.asarray(origin, float) + k * step * normal for k in range(n)]
    for k in order:
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [_ds(v) for v in positions[k]]
        item.PlanePositionSequence = DicomSequence([pos])
        content = Dataset()
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = values[order].astype(np.uint16).tobytes()
    ds.save_as(path, write_like_original=False)
    return WrittenSeries([path], study_uid, series_uid, values * slope + intercept, positions[0],
                         (pixel_spacing[1], pixel_spacing[0], step), np.stack([row_dir, col_dir, normal], 1))


def write_localizer(folder: str | os.PathLike, study_uid: str, *, series_number: int = 100,
                    modality: str = "CT") -> WrittenSeries:
    """A scout: three single images in three planes, ImageType ...\\LOCALIZER."""
    folder = Path(folder)
    series_uid = generate_uid()
    files = []
    for i, axes in enumerate((AXIAL, CORONAL, SAGITTAL)):
        w = write_series(folder, n=1, rows=32, cols=32, axes=axes, modality=modality, study_uid=study_uid,
                         series_uid=series_uid, series_number=series_number, description="Scout",
                         image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), name=lambda _, i=i: f"scout_{i}", seed=i)
        files += w.files
    return WrittenSeries(files, study_uid, series_uid, np.zeros(0), np.zeros(3), (1, 1, 1), np.eye(3))


def write_sr(path: str | os.PathLike, study_uid: str, *, series_number: int = 900) -> Path:
    """A Basic Text SR object (a structured report: no pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base(BASIC_TEXT_SR, "SR", study_uid, generate_uid(), series_number, "Dose report", None)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.InstanceNumber = 1
    ds.save_as(path, write_like_original=False)
    return path


def write_secondary_capture(path: str | os.PathLike, study_uid: str, *, series_number: int = 800) -> Path:
    """A secondary capture (a screenshot stored as an image): one 2D frame."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _base(SECONDARY_CAPTURE, "OT", study_uid, generate_uid(), series_number, "Screen save",
               ("DERIVED", "SECONDARY"))
    _pixel_module(ds, 24, 24, signed=False)
    ds.InstanceNumber = 1
    ds.ConversionType = "WSD"
    ds.PixelData = np.arange(24 * 24, dtype=np.uint16).tobytes()
    ds.save_as(path, write_like_original=False)
    return path


def write_undecodable(folder: str | os.PathLike, study_uid: str, *, n: int = 10, series_number: int = 50) -> list[Path]:
    """A series whose pixel data claims JPEG 2000 but holds bytes no decoder accepts."""
    from pydicom.encaps import encapsulate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    files = []
    for k in range(n):
        ds = _base(CT_IMAGE, "CT", study_uid, series_uid, series_number, "broken j2k", ("ORIGINAL", "PRIMARY", "AXIAL"),
                   transfer_syntax=JPEG2000_LOSSLESS)
        ds.is_implicit_VR = False
        _pixel_module(ds, 16, 16, signed=False)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = ["0", "0", _ds(2.0 * k)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["1", "1"]
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 this is not a codestream" + bytes([k])])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        path = folder / f"j2k_{k:03d}.dcm"
        ds.save_as(path, write_like_original=False)
        files.append(path)
    return files


def truncate(path: str | os.PathLike, keep: float = 0.6, keep_bytes: int | None = None) -> Path:
    """Cut a file to ``keep`` of its length, or to ``keep_bytes`` (an interrupted copy)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: keep_bytes if keep_bytes is not None else int(len(data) * keep)])
    return path


def write_junk(path: str | os.PathLike, text: str = "not an image: export log\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text * 20)
    return path


def read_sitk_series(files: Sequence[str | os.PathLike]):
    """SimpleITK's reading of one series (GDCM's file ordering), the reference for geometry."""
    import SimpleITK as sitk

    folder = str(Path(files[0]).parent)
    wanted = {str(Path(f).resolve()) for f in files}
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_uid)
    names = [n for n in names if str(Path(n).resolve()) in wanted]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    return reader.Execute()
