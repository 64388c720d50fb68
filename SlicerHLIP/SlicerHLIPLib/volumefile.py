"""A volume file's voxel grid (size and IJK->RAS), read with SimpleITK.

SimpleITK is part of 3D Slicer's Python and of this project's environment; it is imported when a
header is first read, so the rest of SlicerHLIPLib imports without it. Inside Slicer the module
reads and writes voxels with Slicer's own storage nodes; this is only the client's check that a
heat map the server sent is a volume, and the grid it lies on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LPS_TO_RAS = (-1.0, -1.0, 1.0)


class VolumeFileError(ValueError):
    """A file SimpleITK cannot read as a 3D volume."""


@dataclass
class VolumeHeader:
    size: tuple  # voxels along i, j, k (SimpleITK's GetSize())
    affine_ras: list  # 4x4 row-major list of lists: IJK -> RAS (mm), what a Slicer volume node calls IJKToRAS

    @property
    def spacing(self) -> tuple:
        m = self.affine_ras
        return tuple(math.sqrt(sum(m[r][c] ** 2 for r in range(3))) for c in range(3))


def read_header(path) -> VolumeHeader:
    """The grid of the volume file at ``path`` (NIfTI, NRRD, MetaImage: what SimpleITK reads),
    without reading its voxels. Raises VolumeFileError when it is not a 3D volume."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeFileError(f"not a volume file SimpleITK reads: {str(e).strip().splitlines()[-1]}") from None
    size = tuple(int(n) for n in reader.GetSize())
    if len(size) != 3:
        raise VolumeFileError(f"a {len(size)}D image, not a 3D volume")
    spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    affine = [[LPS_TO_RAS[r] * direction[3 * r + c] * spacing[c] for c in range(3)] + [LPS_TO_RAS[r] * origin[r]] for r in range(3)]
    return VolumeHeader(size, affine + [[0.0, 0.0, 0.0, 1.0]])


def same_geometry(a: VolumeHeader, b: VolumeHeader, tolerance: float = 1e-4) -> bool:
    """Same voxel grid: size and IJK->RAS equal within ``tolerance`` (mm)."""
    if tuple(a.size) != tuple(b.size):
        return False
    return all(abs(a.affine_ras[r][c] - b.affine_ras[r][c]) <= tolerance for r in range(3) for c in range(4))
