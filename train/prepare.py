"""Prepare an archive of studies for training: DICOM trees and NIfTI/NRRD/MHA folders in, model-grid
arrays and a JSON Lines manifest out (hlip_core.data.prepare_archive does the work).

    python train/prepare.py SRC OUT [--target-shape 48 224 224] [--workers 8] [--reports reports.csv ...]
    python train/prepare.py SRC OUT --shard 3/16          # one part of 16 (an array job), then:
    python train/prepare.py SRC OUT --merge               # join the 16 shard manifests

Stop it at any moment and run the same command again: finished studies are kept, the rest is done.
Every file and series that is not used is listed with its reason in OUT/skipped.jsonl.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from hlip_core.data import IngestOptions, PreprocessSettings, merge_shards, prepare_archive
from hlip_core.data.archive import parse_shard


def settings_of(args, defaults: PreprocessSettings) -> PreprocessSettings:
    """The preprocessing settings the options ask for; with --preset released, an option the released
    pipeline fixes (orientation, spacing, percentiles, smoothing, storage) is refused by name."""
    if args.preset == "released":
        fixed = {"--orientation": args.orientation != defaults.orientation, "--spacing": args.spacing is not None,
                 "--percentiles": tuple(args.percentiles) != defaults.percentiles, "--no-antialias": args.no_antialias,
                 "--storage": args.storage != defaults.storage}
        given = [name for name, changed in fixed.items() if changed]
        if given:
            raise ValueError(f"--preset released fixes {', '.join(given)}; leave {'it' if len(given) == 1 else 'them'} out")
        return PreprocessSettings.from_dict({"preset": "released", "target_shape": tuple(args.target_shape),
                                             "ct_window": tuple(args.ct_window)})
    return PreprocessSettings(target_shape=tuple(args.target_shape), orientation=args.orientation,
                              spacing=tuple(args.spacing) if args.spacing else None, ct_window=tuple(args.ct_window),
                              percentiles=tuple(args.percentiles), antialias=not args.no_antialias, storage=args.storage)


def build_parser() -> argparse.ArgumentParser:
    defaults_p, defaults_o = PreprocessSettings(), IngestOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder tree of DICOM files (any layout) and/or NIfTI/NRRD/MHA files (one folder = one study)")
    p.add_argument("out", help="output folder (manifest.jsonl, preprocess.json, skipped.jsonl, arrays/)")
    g = p.add_argument_group("model grid and intensities")
    g.add_argument("--preset", choices=["hlip_core", "released"], default=defaults_p.preset,
                   help="'hlip_core': this project's pipeline (the options below); 'released': the released HLIP models' "
                        "pipeline (RPI, uint8/255, pad to square, resize, centre crop; only --target-shape and --ct-window "
                        "may change it). Prepare data for a released model with 'released' (default: %(default)s)")
    g.add_argument("--target-shape", type=int, nargs=3, metavar=("D", "H", "W"), default=list(defaults_p.target_shape),
                   help="model grid (default: %(default)s)")
    g.add_argument("--spacing", type=float, nargs=3, metavar=("D", "H", "W"), default=None,
                   help="resample to this spacing in mm and crop/pad the centre to the grid (default: resize the whole field of view)")
    g.add_argument("--orientation", default=defaults_p.orientation,
                   help="canonical orientation code of the W, H, D axes (default: %(default)s: W to the patient's left, H posterior, D superior)")
    g.add_argument("--ct-window", type=float, nargs=2, metavar=("LOW", "HIGH"), default=list(defaults_p.ct_window),
                   help="Hounsfield window mapped to [0, 1] for CT (default: %(default)s)")
    g.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), default=list(defaults_p.percentiles),
                   help="intensity percentiles mapped to [0, 1] for MR and other modalities (default: %(default)s)")
    g.add_argument("--no-antialias", action="store_true", help="no Gaussian smoothing before downsampling (default: smooth)")
    g.add_argument("--storage", choices=["uint8", "float16"], default=defaults_p.storage, help="array dtype (default: %(default)s)")
    g = p.add_argument_group("series selection")
    g.add_argument("--min-slices", type=int, default=defaults_o.min_slices, help="skip volumes with fewer slices (default: %(default)s)")
    g.add_argument("--exclude-derived", action="store_true", help="skip series whose ImageType is DERIVED (default: keep them)")
    g.add_argument("--max-gap", type=int, default=defaults_o.max_gap,
                   help="fill up to this many consecutive missing slices by interpolation; larger gaps skip the series (default: %(default)s)")
    g.add_argument("--repeated", choices=["split", "first", "last"], default=defaults_o.repeated,
                   help="series with several images per position (time series, diffusion, echoes): one volume each, or only the first/last (default: %(default)s)")
    g.add_argument("--max-volumes", type=int, default=defaults_o.max_volumes,
                   help="at most this many volumes from one split series (default: %(default)s)")
    g.add_argument("--volume-modality", default=defaults_o.volume_modality,
                   help="modality of NIfTI/NRRD/MHA files: MR, CT, ... or auto (CT when the 1st percentile < -500) (default: %(default)s)")
    g.add_argument("--study-ids", choices=["uid", "hash", "folder"], default=defaults_o.study_ids,
                   help="ids of DICOM studies in the output: StudyInstanceUID, a hash of it, or the folder (default: %(default)s)")
    g = p.add_argument_group("reports and labels")
    g.add_argument("--reports", default=None, help="CSV/TSV/JSON/JSONL with one row per study (default: none)")
    g.add_argument("--report-key", default="study_id", help="column holding the study key (default: %(default)s)")
    g.add_argument("--report-match", default="auto", choices=["auto", "study_id", "study_uid", "accession", "folder", "folder_name"],
                   help="what the key is: the output study id, StudyInstanceUID, AccessionNumber, the study folder "
                        "(relative path or last name); auto tries them in that order (default: %(default)s)")
    g.add_argument("--report-column", default="report", help="column holding the report text (default: %(default)s)")
    g.add_argument("--label-columns", default="", help="comma-separated 0/1 label columns (default: none)")
    g.add_argument("--split-column", default=None, help="column holding train/valid/test (default: none)")
    g = p.add_argument_group("running")
    g.add_argument("--workers", type=int, default=1, help="worker processes (default: %(default)s)")
    g.add_argument("--shard", default="0/1", help="prepare only part I of N, deterministic by study (default: %(default)s)")
    g.add_argument("--merge", action="store_true", help="join the finished shard manifests in OUT into OUT/manifest.jsonl and exit")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (default: show one)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.merge:
        try:
            summary = merge_shards(args.out)
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"merged {summary['shards']} shards: {summary['studies']} studies, {summary['scans']} scans -> {args.out}/manifest.jsonl")
        return 0
    try:
        settings = settings_of(args, PreprocessSettings())
        shard = parse_shard(args.shard)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = [c.strip() for c in args.label_columns.split(",") if c.strip()]
    try:
        summary = prepare_archive(
            args.source, args.out, settings, reports=args.reports, report_key=args.report_key,
            report_column=args.report_column, label_columns=labels or None, workers=args.workers, shard=shard,
            progress=not args.no_progress, report_match=args.report_match, split_column=args.split_column,
            min_slices=args.min_slices, keep_derived=not args.exclude_derived, max_gap=args.max_gap, repeated=args.repeated,
            max_volumes=args.max_volumes, volume_modality=args.volume_modality, study_ids=args.study_ids)
    except (FileNotFoundError, ValueError) as exc:  # bad input named in one line, no stack trace
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary["failed"] == 0 else 1


def format_summary(s: dict) -> str:
    lines = [f"studies: {s['studies']} (shard {s['shard']}): {s['prepared']} prepared now, {s['already_done']} already done, "
             f"{s['without_scans']} without a usable scan, {s['failed']} failed",
             f"scans kept: {s['scans']}",
             "skipped: " + (", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "nothing"),
             f"reports matched: {s['reports_matched']}",
             f"time: {s['seconds']:.1f} s, {s['studies_per_second'] or 0:.2f} studies/s with {s['workers']} worker(s), "
             f"{s['cpu_seconds_per_study']:.2f} CPU s per study, peak memory of a worker {s['peak_worker_memory_mb']} MB",
             "complete" if s["complete"] else "NOT complete: run the same command again to finish",
             "summary: " + json.dumps(s, sort_keys=True)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
