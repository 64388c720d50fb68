"""Files a hostile or clumsy client would upload (issue 20), made without ever holding their
expanded data in memory: a gzip bomb, truncated and non-finite NIfTI files."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

ZEROS = 16 << 20  # one gzip member holds 16 MB of zeros (~16 kB compressed)


def nifti_header_bytes(shape, dtype=np.float32) -> bytes:
    """A NIfTI-1 header (348 bytes + the 4-byte extension flag) for a volume of ``shape``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header.binaryblock + b"\0\0\0\0"


def _member(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def write_gzip_bomb(path: Path, shape=(1024, 1024, 1024), dtype=np.float32) -> Path:
    """A .nii.gz whose header and data announce ``shape`` (1024^3 float32: 4 GB expanded) in a few
    MB: a multi-member gzip file repeating one compressed 16 MB block of zeros."""
    total = int(np.prod(shape)) * np.dtype(dtype).itemsize
    block = _member(bytes(ZEROS))
    with open(path, "wb") as out:
        out.write(_member(nifti_header_bytes(shape, dtype)))
        for _ in range(total // ZEROS):
            out.write(block)
        rest = total % ZEROS
        if rest:
            out.write(_member(bytes(rest)))
    return path


def write_nifti(path: Path, volume: np.ndarray, keep_bytes: int | None = None) -> Path:
    """``volume`` as .nii or .nii.gz (by the suffix); ``keep_bytes``: only that many bytes of the
    uncompressed file are kept (a truncated file whose header still announces the whole volume)."""
    raw = nifti_header_bytes(volume.shape[::-1], volume.dtype) + np.ascontiguousarray(volume).tobytes()
    raw = raw[:keep_bytes] if keep_bytes is not None else raw
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


def gzip_is_valid(path: Path) -> bool:
    try:
        with gzip.open(path) as f:
            f.read(1)
        return True
    except (OSError, zlib.error):
        return False
