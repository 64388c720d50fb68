"""NIfTI-1/NIfTI-2 headers with the standard library: a volume's geometry without nibabel or
SimpleITK (neither is in Slicer's Python by default), its voxels when numpy is there, and
``write_nifti`` for a volume given as an array and its IJK->RAS matrix (how the Slicer module
hands a volume node to a worker thread, so that no file is written on the GUI thread).

Geometry follows the NIfTI standard (and nibabel's choice of transform): the sform when its code
is set, else the qform, else the voxel sizes alone. ``affine_ras`` maps voxel indices (i, j, k)
to RAS millimetres, which is what a Slicer volume node calls IJKToRAS; ``origin_lps``,
``spacing`` and ``direction_lps`` are the same geometry the way ITK/SimpleITK report it.
"""
from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

# NIfTI datatype code -> (numpy dtype name, bytes per voxel)
DATATYPES = {
    2: ("uint8", 1), 4: ("int16", 2), 8: ("int32", 4), 16: ("float32", 4), 64: ("float64", 8),
    256: ("int8", 1), 512: ("uint16", 2), 768: ("uint32", 4), 1024: ("int64", 8), 1280: ("uint64", 8),
}


class NiftiError(ValueError):
    """A file that is not a NIfTI volume this reader understands."""


@dataclass
class NiftiHeader:
    version: int  # 1 or 2
    shape: tuple  # voxels along i, j, k (and further dimensions, if any)
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float
    affine_ras: list  # 4x4 row-major list of lists: IJK -> RAS (mm)
    transform_source: str  # "sform", "qform" or "pixdim"
    byte_order: str  # "<" or ">"

    @property
    def size(self) -> tuple:
        """(i, j, k) voxel counts, as SimpleITK's GetSize()."""
        return tuple(int(n) for n in (tuple(self.shape) + (1, 1, 1))[:3])

    @property
    def spacing(self) -> tuple:
        m = self.affine_ras
        return tuple(math.sqrt(sum(m[r][c] ** 2 for r in range(3))) for c in range(3))

    @property
    def origin_lps(self) -> tuple:
        m = self.affine_ras
        return (-m[0][3], -m[1][3], m[2][3])

    @property
    def direction_lps(self) -> tuple:
        """Row-major 3x3 direction cosines in LPS, as SimpleITK's GetDirection()."""
        m, spacing = self.affine_ras, self.spacing
        flip = (-1.0, -1.0, 1.0)
        return tuple(flip[r] * m[r][c] / (spacing[c] or 1.0) for r in range(3) for c in range(3))

    @property
    def dtype(self) -> str:
        if self.datatype not in DATATYPES:
            raise NiftiError(f"NIfTI datatype {self.datatype} is not supported")
        return DATATYPES[self.datatype][0]


def _open(path):
    path = str(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _quaternion_affine(b, c, d, qfac, pixdim, offset) -> list:
    a2 = 1.0 - (b * b + c * c + d * d)
    a = math.sqrt(a2) if a2 > 1e-7 else 0.0  # b, c, d may describe a 180-degree turn (a = 0)
    if a == 0.0:
        norm = math.sqrt(b * b + c * c + d * d) or 1.0
        b, c, d = b / norm, c / norm, d / norm
    rot = [
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
    ]
    scale = (pixdim[0], pixdim[1], qfac * pixdim[2])
    out = [[rot[r][col] * scale[col] for col in range(3)] + [offset[r]] for r in range(3)]
    return out + [[0.0, 0.0, 0.0, 1.0]]


def parse_header(raw: bytes) -> NiftiHeader:
    """A NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes) header from the first bytes of a file."""
    if len(raw) < 348:
        raise NiftiError("too short to be a NIfTI file")
    for order in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(order + "i", raw[:4])
        if sizeof_hdr in (348, 540):
            break
    else:
        raise NiftiError("not a NIfTI file (header size is neither 348 nor 540)")
    if sizeof_hdr == 348:
        if raw[344:347] not in (b"n+1", b"ni1"):
            raise NiftiError("not a NIfTI-1 file (no 'n+1' magic; an Analyze file?)")
        dim = struct.unpack(order + "8h", raw[40:56])
        datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
        pixdim = struct.unpack(order + "8f", raw[76:108])
        vox_offset, scl_slope, scl_inter = struct.unpack(order + "3f", raw[108:120])
        qform_code, sform_code = struct.unpack(order + "2h", raw[252:256])
        quatern = struct.unpack(order + "6f", raw[256:280])
        srows = struct.unpack(order + "12f", raw[280:328])
        version = 1
    else:
        if len(raw) < 540:
            raise NiftiError("too short to be a NIfTI-2 file")
        if raw[4:7] not in (b"n+2", b"ni2"):
            raise NiftiError("not a NIfTI-2 file (no 'n+2' magic)")
        datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
        dim = struct.unpack(order + "8q", raw[16:80])
        pixdim = struct.unpack(order + "8d", raw[104:168])
        (vox_offset,) = struct.unpack(order + "q", raw[168:176])
        scl_slope, scl_inter = struct.unpack(order + "2d", raw[176:192])
        qform_code, sform_code = struct.unpack(order + "2i", raw[344:352])
        quatern = struct.unpack(order + "6d", raw[352:400])
        srows = struct.unpack(order + "12d", raw[400:496])
        version = 2
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise NiftiError(f"NIfTI header has {ndim} dimensions")
    shape = tuple(int(n) for n in dim[1:1 + ndim])
    spacing = [abs(p) if p else 1.0 for p in pixdim[1:4]]
    if sform_code > 0:
        affine = [list(srows[0:4]), list(srows[4:8]), list(srows[8:12]), [0.0, 0.0, 0.0, 1.0]]
        source = "sform"
    elif qform_code > 0:
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        affine = _quaternion_affine(*quatern[:3], qfac, spacing, quatern[3:6])
        source = "qform"
    else:
        affine = [[spacing[0], 0.0, 0.0, 0.0], [0.0, spacing[1], 0.0, 0.0], [0.0, 0.0, spacing[2], 0.0], [0.0, 0.0, 0.0, 1.0]]
        source = "pixdim"
    return NiftiHeader(version, shape, int(datatype), int(bitpix), int(vox_offset), float(scl_slope), float(scl_inter),
                       [[float(v) for v in row] for row in affine], source, order)


def read_header(path) -> NiftiHeader:
    """The header of a .nii or .nii.gz file (only its first 540 bytes are decompressed)."""
    try:
        with _open(path) as f:
            raw = f.read(540)
    except (OSError, EOFError) as e:
        raise NiftiError(f"{Path(path).name}: cannot be read as NIfTI ({e})") from None
    return parse_header(raw)


def read_voxels(path):
    """(header, numpy array [k, j, i] like SimpleITK's GetArrayFromImage, slope/intercept applied).
    Needs numpy (Slicer has it)."""
    import numpy as np

    header = read_header(path)
    with _open(path) as f:
        data = f.read()
    count = 1
    for n in header.shape:
        count *= n
    dtype = np.dtype(header.dtype).newbyteorder(header.byte_order)
    needed = header.vox_offset + count * dtype.itemsize
    if len(data) < needed:
        raise NiftiError(f"{Path(path).name}: holds {len(data)} bytes, its header promises {needed}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header.vox_offset)
    array = array.reshape(header.shape, order="F").T  # NIfTI stores i fastest; index as [..., k, j, i]
    if header.scl_slope != 0.0 and (header.scl_slope != 1.0 or header.scl_inter != 0.0):  # slope 0: no scaling
        array = array * header.scl_slope + header.scl_inter
    return header, np.ascontiguousarray(array)


def same_geometry(a: NiftiHeader, b: NiftiHeader, tolerance: float = 1e-4) -> bool:
    """Same voxel grid: size and IJK->RAS equal within ``tolerance`` (mm)."""
    if a.size != b.size:
        return False
    return all(abs(a.affine_ras[r][c] - b.affine_ras[r][c]) <= tolerance for r in range(3) for c in range(4))


NUMPY_TO_NIFTI = {name: code for code, (name, _) in DATATYPES.items()}


def _quaternion_of(rotation) -> tuple:
    """(b, c, d, qfac) of a 3x3 orthonormal matrix, as the NIfTI standard's mat44_to_quatern."""
    r = [list(row) for row in rotation]
    det = (r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1]) - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
           + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]))
    qfac = 1.0
    if det < 0:  # a reflection: NIfTI keeps it in qfac, the quaternion describes a proper rotation
        qfac = -1.0
        for row in r:
            row[2] = -row[2]
    trace = r[0][0] + r[1][1] + r[2][2] + 1.0
    if trace > 0.5:
        a = 0.5 * math.sqrt(trace)
        b, c, d = 0.25 * (r[2][1] - r[1][2]) / a, 0.25 * (r[0][2] - r[2][0]) / a, 0.25 * (r[1][0] - r[0][1]) / a
    else:
        xd, yd, zd = 1.0 + r[0][0] - (r[1][1] + r[2][2]), 1.0 + r[1][1] - (r[0][0] + r[2][2]), 1.0 + r[2][2] - (r[0][0] + r[1][1])
        if xd > 1.0:
            b = 0.5 * math.sqrt(xd)
            c, d, a = 0.25 * (r[0][1] + r[1][0]) / b, 0.25 * (r[0][2] + r[2][0]) / b, 0.25 * (r[2][1] - r[1][2]) / b
        elif yd > 1.0:
            c = 0.5 * math.sqrt(yd)
            b, d, a = 0.25 * (r[0][1] + r[1][0]) / c, 0.25 * (r[1][2] + r[2][1]) / c, 0.25 * (r[0][2] - r[2][0]) / c
        else:
            d = 0.5 * math.sqrt(zd)
            b, c, a = 0.25 * (r[0][2] + r[2][0]) / d, 0.25 * (r[1][2] + r[2][1]) / d, 0.25 * (r[1][0] - r[0][1]) / d
        if a < 0:
            b, c, d = -b, -c, -d
    return b, c, d, qfac


def write_nifti(path, array, affine_ras) -> str:
    """Write a 3D volume as an uncompressed NIfTI-1 file (or gzip-compressed when ``path`` ends
    with .gz), atomically.

    array: numpy array [k, j, i] (as Slicer's arrayFromVolume gives it; uint8, int8, (u)int16,
    (u)int32, (u)int64, float32 or float64); affine_ras: 4x4 IJK->RAS matrix (Slicer's IJKToRAS).
    Both the sform and the qform are written (code 1, scanner coordinates), so ITK, nibabel and
    Slicer read the same geometry."""
    import os
    import tempfile

    import numpy as np

    array = np.asarray(array)
    if array.ndim != 3:
        raise NiftiError(f"write_nifti takes a 3D array [k, j, i], got shape {array.shape}")
    dtype = array.dtype.newbyteorder("=")
    if dtype.name not in NUMPY_TO_NIFTI:
        raise NiftiError(f"voxels of type {dtype.name} cannot be written as NIfTI here")
    m = [[float(v) for v in row] for row in affine_ras]
    spacing = [math.sqrt(sum(m[r][c] ** 2 for r in range(3))) for c in range(3)]
    if min(spacing) <= 0:
        raise NiftiError("the IJK->RAS matrix has a zero column (no voxel size)")
    b, c, d, qfac = _quaternion_of([[m[r][col] / spacing[col] for col in range(3)] for r in range(3)])
    nk, nj, ni = array.shape
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, NUMPY_TO_NIFTI[dtype.name], 8 * dtype.itemsize)
    struct.pack_into("<8f", header, 76, qfac, *spacing, 0.0, 0.0, 0.0, 0.0)
    struct.pack_into("<3f", header, 108, 352.0, 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    header[123] = 2  # xyzt_units: millimetres
    struct.pack_into("<2h", header, 252, 1, 1)  # qform_code, sform_code: scanner coordinates
    struct.pack_into("<6f", header, 256, b, c, d, m[0][3], m[1][3], m[2][3])
    struct.pack_into("<12f", header, 280, *m[0], *m[1], *m[2])
    header[344:348] = b"n+1\0"
    data = bytes(header) + b"\0\0\0\0" + np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, partial = tempfile.mkstemp(prefix=".partial-", suffix=".nii", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".gz"):
                with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as z:
                    z.write(data)
            else:
                f.write(data)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.unlink(partial)
        raise
    return path
