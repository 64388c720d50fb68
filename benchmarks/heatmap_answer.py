"""Size and round-trip time of the findings answer's heat maps (issue 20), tiny and ViT-B, on CPU.

For each model an untrained checkpoint (random weights) scores one study of 4 synthetic NIfTI
scans (``--shape`` voxels each, distinct geometry) for the server's 8 default findings with heat
maps, in this process. The maps the model gives are then encoded three ways and the multipart
answer built as the server builds it:

- ``float32, every scan``: each finding's map on every scan the model read, float32 ``.nii.gz``
  (what a client asking for all scans got before issue 20: the encoding of main at 38ede2b);
- ``float32, driving scan``: main's default at 38ede2b, one float32 map per finding;
- ``uint8+scale, driving scan`` (the default now) and ``uint8+scale, every scan``
  (``heatmap_scans: "all"``): ``quantised_nifti`` of the server, each as file parts
  (``heatmap_format: "parts"``) and as one ``heatmaps.zip`` part (``"zip"``, MONAI Label's client).

Round trip: the server's encoding of the maps and of the multipart answer, plus the client
splitting the answer (requests_toolbelt's MultipartDecoder), unpacking the zip when there is one
and reading every map back with SimpleITK (what 3D Slicer's NIfTI reader, ITK, does), median of
``--repeats``; the model's own work is not in it (its time is printed apart). The largest error of the read-back values against the float maps is printed
with the quantisation step bound (half a step of (max-min)/255 per map).

    python benchmarks/heatmap_answer.py                      # tiny and ViT-B
    python benchmarks/heatmap_answer.py --configs tiny --repeats 3
    python benchmarks/heatmap_answer.py --configs vitb --repeats 1 --no-float32   # the uint8 rows only
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


def read_back(body: bytes, content_type: str, folder: Path) -> list:
    """Every map of a multipart answer (file parts or one zip part) as read by SimpleITK, in order."""
    import io
    import zipfile

    import SimpleITK as sitk
    from requests_toolbelt import MultipartDecoder

    files = []
    for part in MultipartDecoder(body, content_type).parts[1:]:  # the first is the JSON 'params'
        if part.content.startswith(b"PK"):
            with zipfile.ZipFile(io.BytesIO(part.content)) as z:
                files += [z.read(n) for n in z.namelist()]
        else:
            files.append(part.content)
    out = []
    for i, data in enumerate(files):
        path = folder / f"back{i}.nii.gz"
        path.write_bytes(data)
        out.append(sitk.GetArrayFromImage(sitk.ReadImage(str(path))))
        path.unlink()
    return out


def measure(config: str, target_shape, shape, repeats: int, threads: int, float32: bool = True) -> list[dict]:
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
        start = time.perf_counter()
        result = predictor.predict([str(f) for f in files], findings, heatmaps=True)
        print(f"{config}: the model's findings and heat maps took {time.perf_counter() - start:.1f} s (not in the round trip)", flush=True)
        driving = [(f"heatmap_{j}", result.heatmaps[f]) for j, f in enumerate(findings)]
        every = [(f"heatmap_{j}_scan{i}", image) for j, f in enumerate(findings) for i, image in enumerate(result.all_heatmaps[f].values())]
        rows = []
        encodings = [("float32, every scan", every, float32_nifti, False), ("float32, driving scan", driving, float32_nifti, False)] if float32 else []
        encodings += [("uint8+scale, driving scan, parts", driving, quantised_nifti, False),
                      ("uint8+scale, driving scan, zip", driving, quantised_nifti, True),
                      ("uint8+scale, every scan, parts", every, quantised_nifti, False),
                      ("uint8+scale, every scan, zip", every, quantised_nifti, True)]
        for label, maps, encode, zipped in encodings:
            times, size, error, bound = [], 0, 0.0, 0.0
            for _ in range(repeats):
                start = time.perf_counter()
                parts = [(name, encode(image, tmp)) for name, image in maps]
                body, content_type = multipart({"findings": []}, parts, zipped=zipped)
                values = read_back(body, content_type, tmp)
                times.append(time.perf_counter() - start)
                size = len(body)
            assert len(values) == len(maps), f"{label}: {len(values)} maps read back, {len(maps)} sent"
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
    parser.add_argument("--no-float32", action="store_true", help="leave out the float32 rows (the encoding before issue 20; slow)")
    args = parser.parse_args(argv)
    print(f"one study of 4 scans of {'x'.join(map(str, args.shape))} voxels, 8 findings; median of {args.repeats}")
    print(f"{'model':34s} {'encoding':34s} {'maps':>4s} {'answer MB':>10s} {'round trip s':>12s} {'max error':>10s} {'half step':>10s}")
    for name in args.configs:
        config, target = CONFIGS[name]
        for r in measure(config, target, tuple(args.shape), args.repeats, args.threads, not args.no_float32):
            print(f"{r['model']:34s} {r['encoding']:34s} {r['maps']:4d} {r['mb']:10.2f} {r['seconds']:12.2f} {r['error']:10.2e} {r['bound']:10.2e}")


if __name__ == "__main__":
    main()
