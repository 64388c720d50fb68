"""Size and round-trip time of the findings answer's heat maps (issue 20), tiny and ViT-B, on CPU.

For each model an untrained checkpoint (random weights) scores one study of 4 synthetic NIfTI
scans (``--shape`` voxels each, distinct geometry) for the server's 8 default findings with heat
maps, in this process. The maps the model gives are then encoded three ways and the multipart
answer built as the server builds it:

- ``float32, every scan``: each finding's map on every scan the model read, float32 ``.nii.gz``
  (what a client asking for all scans got before issue 20: the encoding of main at 38ede2b);
- ``float32, driving scan``: main's default at 38ede2b, one float32 map per finding;
- ``uint8+scale, driving scan`` (the default now) and ``uint8+scale, every scan``
  (``heatmap_scans: "all"``): ``quantised_nifti`` of the server.

Round trip: the server's encoding of the maps plus the client reading every map back with
SimpleITK (what 3D Slicer's NIfTI reader, ITK, does), median of ``--repeats``; the model's own
work is not in it. The largest error of the read-back values against the float maps is printed
with the quantisation step bound (half a step of (max-min)/255 per map).

    python benchmarks/heatmap_answer.py                      # tiny and ViT-B
    python benchmarks/heatmap_answer.py --configs tiny --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from server_helpers import make_checkpoint, write_nifti_study  # noqa: E402

CONFIGS = {"tiny": ("tiny_multiscan_h2", (32, 64, 64)), "vitb": ("vit_base_multiscan_h2_token1176", (48, 224, 224))}


def float32_nifti(image, folder: Path) -> bytes:
    """main's encoding at 38ede2b: the map as float32 .nii.gz written by SimpleITK."""
    import SimpleITK as sitk

    path = folder / "float.nii.gz"
    sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(path), True)
    data = path.read_bytes()
    path.unlink()
    return data


def read_back(parts: list, folder: Path) -> list:
    import SimpleITK as sitk

    out = []
    for name, data in parts:
        path = folder / f"{name}.nii.gz"
        path.write_bytes(data)
        out.append(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        path.unlink()
    return out


def measure(config: str, target_shape, shape, repeats: int, threads: int) -> list[dict]:
    import numpy as np
    import SimpleITK as sitk
    import torch

    from hlip_core.inference import StudyPredictor
    from monailabel_app.lib.configs import DEFAULT_FINDINGS
    from monailabel_app.lib.infers.hlip_findings import quantised_nifti
    from monailabel_app.lib.service import multipart

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = write_nifti_study(tmp / "study", n_scans=4, shape=shape, seed=7)
        predictor = StudyPredictor.load(make_checkpoint(tmp / "ckpt", config, target_shape))
        findings = list(DEFAULT_FINDINGS)
        result = predictor.predict([str(f) for f in files], findings, heatmaps=True)
        driving = [(f"heatmap_{j}", result.heatmaps[f]) for j, f in enumerate(findings)]
        every = [(f"heatmap_{j}_scan{i}", image) for j, f in enumerate(findings) for i, image in enumerate(result.all_heatmaps[f].values())]
        rows = []
        for label, maps, encode in (("float32, every scan", every, float32_nifti), ("float32, driving scan", driving, float32_nifti),
                                    ("uint8+scale, driving scan", driving, quantised_nifti), ("uint8+scale, every scan", every, quantised_nifti)):
            times, size, error, bound = [], 0, 0.0, 0.0
            for _ in range(repeats):
                start = time.perf_counter()
                parts = [(name, encode(image, tmp)) for name, image in maps]
                body, _ = multipart({"findings": []}, parts)
                values = read_back(parts, tmp)
                times.append(time.perf_counter() - start)
                size = len(body)
            for (_, image), back in zip(maps, values):
                ref = sitk.GetArrayFromImage(image)
                error = max(error, float(np.abs(back - ref).max()))
                bound = max(bound, float(ref.max() - ref.min()) / 255 / 2)
            rows.append({"model": config, "encoding": label, "maps": len(maps), "mb": size / 1e6, "seconds": statistics.median(times),
                         "error": error, "bound": bound if encode is quantised_nifti else 0.0})
        return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["tiny", "vitb"])
    parser.add_argument("--shape", nargs=3, type=int, default=[160, 256, 256], metavar=("D", "H", "W"),
                        help="voxels of each of the 4 scans (slices, rows, columns)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"one study of 4 scans of {'x'.join(map(str, args.shape))} voxels, 8 findings; median of {args.repeats}")
    print(f"{'model':34s} {'encoding':28s} {'maps':>4s} {'answer MB':>10s} {'round trip s':>12s} {'max error':>10s} {'half step':>10s}")
    for name in args.configs:
        config, target = CONFIGS[name]
        for r in measure(config, target, tuple(args.shape), args.repeats, args.threads):
            print(f"{r['model']:34s} {r['encoding']:28s} {r['maps']:4d} {r['mb']:10.2f} {r['seconds']:12.2f} {r['error']:10.2e} {r['bound']:10.2e}")


if __name__ == "__main__":
    main()
