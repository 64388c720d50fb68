"""Limits on what a file may expand to, checked before anything is allocated, and the consistency
checks of a volume file (its data length against its header, finite voxels).

One place for the server (uploads) and the ingestion (studies read from a folder or DICOMweb):

- ``check_volume_file(path, max_voxels)``: a NIfTI file (.nii / .nii.gz, NIfTI-1 or -2, read with
  nibabel's header classes) is refused when its header describes more than ``max_voxels`` voxels
  or more than ``4 * max_voxels`` bytes of data (``VolumeTooLarge``), and when its data are shorter
  than the header says or hold NaN/inf (``VolumeInconsistent``). A .nii.gz is decompressed as a
  stream in 1 MB pieces and never past the header's length (+1 piece): a gzip bomb costs no memory.
- ``check_dicom_file(path, max_voxels)``: Rows x Columns x NumberOfFrames (x samples) of one DICOM
  file's header against the same limit (compressed pixel data expand to that).
- ``copy_capped(src, dst, cap, what)``: a stream copy that stops with ``VolumeTooLarge`` once more
  than ``cap`` bytes came out (zip/tar members, whose declared sizes may lie).

The default, ``DEFAULT_MAX_VOXELS = 512 * 512 * 2048`` (2^29, 537 M voxels, 1 GB as int16, 2 GB
as float32), holds a 512 x 512 CT of 2048 slices (a thin-slice whole-body CT is ~2000 slices of
0.6 mm), a 1024 x 1024 CT of 512 slices, and any MR volume (typically < 50 M voxels); a
1024^3 float32 volume (4 GB) is refused.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

DEFAULT_MAX_VOXELS = 512 * 512 * 2048
BYTES_PER_VOXEL_BUDGET = 4  # data bytes allowed per voxel of the limit (float32)
PIECE = 1 << 20


class VolumeTooLarge(ValueError):
    """The file would expand past the configured limit (an HTTP server answers 413)."""


class VolumeInconsistent(ValueError):
    """The file contradicts its own header: truncated, corrupt stream or non-finite voxels (422).

    ``reason``: "truncated" (the data or header do not match what the header announces, a corrupt
    stream included) or "non_finite" (NaN or infinite voxels): the skip reason ingestion reports."""

    def __init__(self, message: str, reason: str = "truncated"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # the reason survives a trip through a worker process
        return type(self), (str(self), self.reason)


def _figure(n: int) -> str:
    return f"{n:,}"


def check_expansion(voxels: int, data_bytes: int, max_voxels: int, what: str) -> None:
    """Raise VolumeTooLarge when ``voxels`` > ``max_voxels`` or ``data_bytes`` > 4 x ``max_voxels``."""
    if voxels > max_voxels:
        raise VolumeTooLarge(f"{what} holds {_figure(voxels)} voxels; this server accepts at most {_figure(max_voxels)} "
                             "per volume (--conf max_voxels)")
    budget = BYTES_PER_VOXEL_BUDGET * max_voxels
    if data_bytes > budget:
        raise VolumeTooLarge(f"{what} holds {_figure(data_bytes)} bytes of voxel data; this server accepts at most "
                             f"{_figure(budget)} ({BYTES_PER_VOXEL_BUDGET} bytes x --conf max_voxels)")


def _open(path: str):
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


def nifti_header(fh, what: str):
    """The nibabel Nifti1Header/Nifti2Header read from the start of the open binary ``fh``."""
    import nibabel as nib

    start = fh.read(4)
    if len(start) < 4:
        raise VolumeInconsistent(f"{what} is too short to hold a NIfTI header")
    size_le, size_be = int.from_bytes(start, "little"), int.from_bytes(start, "big")
    kind = nib.Nifti1Header if 348 in (size_le, size_be) else nib.Nifti2Header if 540 in (size_le, size_be) else None
    if kind is None:
        raise VolumeInconsistent(f"{what} does not start with a NIfTI-1 or NIfTI-2 header")
    rest = fh.read(kind.sizeof_hdr - 4)
    if len(rest) < kind.sizeof_hdr - 4:
        raise VolumeInconsistent(f"{what} ends inside its NIfTI header")
    try:
        return kind(start + rest, check=False)
    except Exception as e:  # nibabel raises several kinds for a malformed header
        raise VolumeInconsistent(f"{what} has an unreadable NIfTI header ({type(e).__name__})") from None


def is_nifti(path: str) -> bool:
    low = str(path).lower()
    return low.endswith(".nii") or low.endswith(".nii.gz")


def check_volume_file(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS, what: str | None = None) -> None:
    """Check a NIfTI file (.nii, .nii.gz) before it is read: size from the header against the
    limit, then its data streamed (1 MB at a time, never more than the header announces) to check
    that they are complete and finite. Other files pass unchecked. Raises VolumeTooLarge (the
    limit and the figure in the message) or VolumeInconsistent (expected and found byte counts,
    or the count of non-finite voxels)."""
    path = str(path)
    if not is_nifti(path):
        return
    what = what or f"volume file {os.path.basename(path)[:80]!r}"
    try:
        with _open(path) as fh:
            header = nifti_header(fh, what)
            shape = tuple(int(d) for d in header.get_data_shape())
            dtype = header.get_data_dtype()
            voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
            expected = voxels * dtype.itemsize
            check_expansion(voxels, expected, max_voxels, what)
            offset = int(header.get_data_offset())
            skip = offset - header.sizeof_hdr
            if skip > 0 and len(fh.read(skip)) < skip:
                raise VolumeInconsistent(f"{what} ends before its voxel data start (offset {offset})")
            check_finite = dtype.kind in "fc"
            found = bad = 0
            carry = b""
            while found < expected:
                piece = fh.read(min(PIECE, expected - found))
                if not piece:
                    break
                found += len(piece)
                if check_finite:
                    data = carry + piece
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype=dtype))))
                    carry = data[usable:]
    except (EOFError, OSError, zlib.error) as e:
        raise VolumeInconsistent(f"{what} is a corrupt or truncated gzip stream ({type(e).__name__})") from None
    if found < expected:
        raise VolumeInconsistent(f"{what} is truncated: its header announces {_figure(expected)} bytes of voxel data "
                                 f"({' x '.join(map(str, shape))} x {dtype.itemsize}), the file holds {_figure(found)}")
    if bad:
        raise VolumeInconsistent(f"{what} holds {_figure(bad)} non-finite voxels (NaN or infinity)", reason="non_finite")


def check_dicom_file(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS, what: str | None = None) -> None:
    """Rows x Columns x NumberOfFrames x SamplesPerPixel (and BitsAllocated) of one DICOM file's
    header against the limit, before its pixel data are decoded. Raises VolumeTooLarge."""
    import pydicom

    what = what or f"DICOM file {os.path.basename(str(path))[:80]!r}"
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True,
                             specific_tags=["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"])
    except Exception:  # not readable as DICOM: the ingestion says why, with its own reason
        return

    def number(name: str, default: int) -> int:
        try:
            value = ds.get(name, default)
            return max(int(value if value not in (None, "") else default), 0)
        except (TypeError, ValueError):
            return default

    voxels = number("Rows", 0) * number("Columns", 0) * max(number("NumberOfFrames", 1), 1) * max(number("SamplesPerPixel", 1), 1)
    check_expansion(voxels, voxels * max(number("BitsAllocated", 16), 1) // 8, max_voxels, what)


def copy_capped(src, dst, cap: int, what: str) -> int:
    """Copy the binary stream ``src`` into ``dst`` 1 MB at a time; VolumeTooLarge as soon as more
    than ``cap`` bytes came out (nothing past the cap is read). Returns the bytes copied."""
    done = 0
    while True:
        piece = src.read(min(PIECE, cap - done + 1))
        if not piece:
            return done
        done += len(piece)
        if done > cap:
            raise VolumeTooLarge(f"{what} unpacks to more than {_figure(cap)} bytes (--conf max_upload_mb)")
        dst.write(piece)
