"""Ask one study in free text: probability per finding, the scan that drives it, and heat maps.

    python train/predict.py --checkpoint CKPT --study path/to/study \
        --findings "intracranial haemorrhage" "midline shift" --heatmaps --out answers/

The study is a folder (DICOM in any layout, or NIfTI/NRRD/MHA files, one per scan) or a list of
files; it is preprocessed exactly as the checkpoint's training data was. Prints a table; with
--out writes findings.json and, with --heatmaps, each finding's heat map as NIfTI in the original
geometry of the scan that drives it (so any viewer overlays it without registration) and a PNG
quick look (three planes through the map's maximum). The probabilities come from a zero-shot
model: they rank and point, they are not diagnoses.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder written by train/pretrain.py or hlip_core.save, or a released HLIP Hugging Face folder (open_clip_config.json; prepared with its released preset)")
    p.add_argument("--study", required=True, nargs="+", help="a study folder, or the files of one study")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--findings", nargs="+", help="findings in free text, e.g. 'midline shift'")
    what.add_argument("--findings-file", help="a text file with one finding per line")
    what.add_argument("--benchmark", help="the findings of a prompt set (ct-rate, cq500, rsna-ich, ... or a .json file)")
    p.add_argument("--heatmaps", action="store_true", help="also compute a heat map per finding (needs --out)")
    p.add_argument("--all-scans", action="store_true", help="write every scan's heat map, not only the driving scan's")
    p.add_argument("--out", default=None, help="output folder for findings.json and heat maps (default: print only)")
    p.add_argument("--volume-modality", choices=("MR", "CT", "auto"), default="auto",
                   help="modality of NIfTI/NRRD/MHA files, which carry none; auto = CT when the values look like HU (default: auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (default: cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="autocast precision (default: fp32)")
    args = p.parse_args(argv)
    if args.heatmaps and not args.out:
        p.error("--heatmaps writes files: give --out")
    return args


def slug(text: str) -> str:
    """A file-name-safe form of a finding's name."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "finding"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from hlip_core.inference import StudyPredictor, save_heatmap_png

    if args.findings_file:
        findings = [line.strip() for line in Path(args.findings_file).read_text().splitlines() if line.strip()]
    elif args.benchmark:
        from hlip_core.eval import load_prompt_set

        findings = load_prompt_set(args.benchmark).findings
    else:
        findings = args.findings
    if findings and isinstance(findings[0], str):
        from hlip_core.eval import findings_from_text

        findings = findings_from_text(findings)  # an empty or over-long finding is refused before any work
    predictor = StudyPredictor.load(args.checkpoint, device=args.device, precision=args.precision)
    source = args.study[0] if len(args.study) == 1 else args.study
    study = predictor.prepare(source, volume_modality=args.volume_modality)
    for skipped in study.skipped:
        logging.info("not used: %s", skipped)
    result = predictor.predict(study, findings, heatmaps=args.heatmaps)
    scans = {s.scan_id: s for s in study.scans}
    width = max(len(f.finding) for f in result.findings)
    print(f"study {result.study_id}: {len(study.scans)} scans used, {len(study.skipped)} files or series not used")
    print(f"{'finding':<{width}}  probability   score  driving scan")
    for f in sorted(result.findings, key=lambda f: -f.probability):
        print(f"{f.finding:<{width}}  {f.probability:11.3f}  {f.score:+.3f}  {f.scan_description or f.scan_id} ({scans[f.scan_id].modality})")
    if args.out:
        import SimpleITK as sitk

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for f in result.findings:
            row = {"finding": f.finding, "probability": f.probability, "score": f.score, "scan_id": f.scan_id,
                   "scan_description": f.scan_description, "scan_modality": scans[f.scan_id].modality}
            if args.heatmaps:
                maps = result.all_heatmaps[f.finding] if args.all_scans else {f.scan_id: result.heatmaps[f.finding]}
                row["heatmaps"] = {}
                for scan_id, heat in maps.items():
                    name = f"{slug(f.finding)}__scan{list(scans).index(scan_id)}"
                    tmp = out / f".{name}.tmp.nii.gz"
                    sitk.WriteImage(heat, str(tmp), True)
                    tmp.replace(out / f"{name}.nii.gz")
                    row["heatmaps"][scan_id] = f"{name}.nii.gz"
                    if scan_id == f.scan_id:
                        save_heatmap_png(scans[scan_id].image, heat, out / f"{name}.png", title=f.finding)
                        row["png"] = f"{name}.png"
            rows.append(row)
        answer = {"study_id": result.study_id, "findings": rows, "skipped": [str(s) for s in study.skipped]}
        tmp = out / ".findings.json.tmp"
        tmp.write_text(json.dumps(answer, indent=2))
        tmp.replace(out / "findings.json")
        print(f"answers{' and heat maps' if args.heatmaps else ''} in {out.resolve()}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, KeyError, FileNotFoundError) as exc:
        sys.exit(f"predict: {exc}")
