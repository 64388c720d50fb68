#!/usr/bin/env python3
"""Make the small excerpts of the real public test data that travel with the repository.

    python tools/make_test_excerpt.py --shared-data PATH/TO/shared/data [--every 8] [--rows 300]

Writes ``tests/data/mri-t1w-dicom/`` (every ``--every``-th slice of the real T1w series, ordered by
position along the slice normal, the files copied byte for byte: headers, pixel data and file
names as distributed) and ``tests/data/ct-rate-labels/valid_labels.csv`` (the header and the first
``--rows`` rows of CT-RATE's validation label file, byte for byte). The licences are copied beside
them. Run it again to remake the excerpts; each folder is written whole and swapped in.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests" / "data"

CT_RATE_NOTICE = """\
valid_labels.csv here is an excerpt (the header and the first {rows} of {total} rows, byte for byte)
of the public label file of the CT-RATE validation split:

  Hamamci et al., 2024, "Developing Generalist Foundation Models from a Multimodal Dataset for 3D
  Computed Tomography" (CT-RATE), as redistributed in the public HLIP repository.

CT-RATE is licensed under Creative Commons Attribution-NonCommercial-ShareAlike 4.0 International
(CC BY-NC-SA 4.0, https://creativecommons.org/licenses/by-nc-sa/4.0/). Change made: rows truncated.
This excerpt is test-only data: it is not part of the software's Apache-2.0 licence, is not
installed with the package, and may be used for non-commercial purposes only, under that licence.
"""


def slices_by_position(folder: Path) -> list[Path]:
    """The series' files ordered by ImagePositionPatient along the slice normal."""
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise SystemExit(f"no .dcm files in {folder}")
    keyed = []
    normal = None
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if normal is None:
            iop = np.asarray(ds.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
        keyed.append((float(normal @ np.asarray(ds.ImagePositionPatient, float)), f))
    keyed.sort()
    return [f for _, f in keyed]


def replace_folder(target: Path, fill) -> None:
    """Write ``target`` through a temporary sibling and swap it in whole: never a half excerpt."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, required=True,
                        help="the folder holding mri-t1w-dicom/ and ct-rate-labels/ (full-size data)")
    parser.add_argument("--every", type=int, default=8, help="keep every N-th slice of the T1w series (default 8)")
    parser.add_argument("--rows", type=int, default=300, help="rows of the CT-RATE label file to keep (default 300)")
    args = parser.parse_args(argv)

    mri = args.shared_data / "mri-t1w-dicom"
    ordered = slices_by_position(mri / "dicoms")
    kept = ordered[:: args.every]

    def fill_mri(tmp: Path) -> None:
        (tmp / "dicoms").mkdir()
        for f in kept:
            shutil.copyfile(f, tmp / "dicoms" / f.name)
        shutil.copyfile(mri / "LICENSE", tmp / "LICENSE")

    replace_folder(OUT / "mri-t1w-dicom", fill_mri)

    labels = args.shared_data / "ct-rate-labels" / "valid_labels.csv"
    lines = labels.read_bytes().splitlines(keepends=True)

    def fill_labels(tmp: Path) -> None:
        (tmp / "valid_labels.csv").write_bytes(b"".join(lines[: 1 + args.rows]))
        (tmp / "NOTICE").write_text(CT_RATE_NOTICE.format(rows=min(args.rows, len(lines) - 1), total=len(lines) - 1))

    replace_folder(OUT / "ct-rate-labels", fill_labels)
    print(f"kept {len(kept)} of {len(ordered)} slices (every {args.every}th) and {min(args.rows, len(lines) - 1)} "
          f"of {len(lines) - 1} label rows under {OUT.relative_to(REPO)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
