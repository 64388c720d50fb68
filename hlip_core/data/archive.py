"""Whole archives: prepare_archive (discover, assemble, preprocess, write arrays and the manifest;
parallel, resumable, shardable) and merge_shards.

Safety when stopped at any moment: every array and sidecar is written to a temporary name and
renamed; a study enters the manifest as ONE appended line, written after all its arrays exist
(its skipped series are appended just before, and dropped again on resume if the study line never
came). A second run reads what is done and prepares only the rest; a torn last line (a kill during
the write) is cut off first. Memory: each worker holds one series at a time (plus the small
model-grid arrays); the parent holds the list of files and studies.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .manifest import MANIFEST, SETTINGS, SKIPPED, ManifestError, check_record
from .preprocess import PreprocessSettings, geometry, settings_like, to_model_space, to_storage
from .reports import match_report, read_reports, split_sentences
from .study import KEEP_HEADERS, StudySource, _bar, discover_studies, iter_scans, plan_study, worker_pool
from .types import IngestOptions, Scan, Skipped

log = logging.getLogger(__name__)

ARRAYS = "arrays"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
# header facts copied into manifest scan entries (the sidecar keeps all of them)
_MANIFEST_FACTS = ("series_number", "image_type", "repetition_time", "echo_time", "inversion_time", "contrast_agent",
                   "kernel", "slice_thickness", "field_strength", "gantry_tilt_deg", "interpolated_slices", "volume")


def safe_name(text: str) -> str:
    """A file-system-safe name for an id; ids that had to change get a short hash (no collisions)."""
    clean = _SAFE.sub("_", text).strip("._") or "x"
    if clean != text or len(clean) > 120:
        clean = f"{clean[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    return clean


def in_shard(study_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic by study id alone: the same study lands in the same shard on every machine."""
    index, count = shard
    return int(hashlib.sha1(study_id.encode()).hexdigest()[:12], 16) % count == index


def parse_shard(text: str | tuple | None) -> tuple[int, int]:
    """"I/N" (0 <= I < N) or (I, N) -> (I, N)."""
    if text is None:
        return (0, 1)
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"shard must look like I/N (for example 0/4), got {text!r}")
        text = (int(m.group(1)), int(m.group(2)))
    index, count = (int(v) for v in text)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= I < N")
    return index, count


def output_names(shard: tuple[int, int]) -> tuple[str, str, str]:
    """(manifest, skipped, summary) file names of a shard; the plain names for a single run."""
    index, count = shard
    if count == 1:
        return MANIFEST, SKIPPED, "summary.json"
    tag = f"shard-{index}-of-{count}"
    return f"manifest.{tag}.jsonl", f"skipped.{tag}.jsonl", f"summary.{tag}.json"


# -- small file helpers ----------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    os.replace(tmp, path)


def _append(path: Path, lines: Iterable[dict]) -> None:
    """Append JSON lines with one write() call (a kill cannot leave half of them)."""
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _complete_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file; a torn last line is cut off the file itself."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        log.warning("%s: removing an incomplete last line (a run was stopped while writing it)", path.name)
        with open(path, "r+b") as fh:
            fh.truncate(end)
    out = []
    for number, line in enumerate(raw[:end].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ManifestError(f"{path}:{number}: not valid JSON; the file was changed by hand?") from None
    return out


# -- one study (runs in worker processes) ------------------------------------------------------------


def _skip_line(study_id: str | None, s: Skipped) -> dict:
    return {"study_id": study_id, **s.to_dict(), "text": str(s)}


def prepare_study(task: dict) -> dict:
    """Assemble, preprocess and store one study. task: study (StudySource as dict), root, out,
    settings (dict), options (dict). Returns {"study_id", "scans": [entries], "skipped": [lines],
    "study_uid", "accession" (for the report lookup only), "error"}."""
    cpu = time.process_time()
    src = StudySource(**task["study"])
    settings = PreprocessSettings.from_dict(task["settings"])
    opts = IngestOptions.from_kwargs(task["options"])
    root, out = task["root"], Path(task["out"])
    result: dict[str, Any] = {"study_id": src.study_id, "scans": [], "skipped": [], "study_uid": src.study_uid,
                              "accession": None, "error": None}
    folder_name = Path(src.folder).name if src.folder not in ("", ".") else Path(root).name
    try:
        plan = plan_study(src.files, opts, study_id=src.study_id, root=root, folder_name=folder_name, instances=src.instances)
        result["accession"] = plan.accession_number
        skipped = list(plan.skipped)
        study_dir = out / ARRAYS / safe_name(src.study_id)
        if plan.scan_count():
            study_dir.mkdir(parents=True, exist_ok=True)
            for stale in study_dir.glob(".*.tmp"):  # left by a run killed while writing this study
                stale.unlink(missing_ok=True)
        names: set[str] = set()
        for item in iter_scans(plan, opts, root):
            if isinstance(item, Skipped):
                skipped.append(item)
                continue
            result["scans"].append(_store_scan(item, settings, study_dir, out, names))
            item.image = None  # free the volume before the next series is assembled
        if not result["scans"]:
            skipped.append(Skipped("study", "no_usable_scan", f"{len(skipped)} file(s)/series skipped"))
        result["skipped"] = [_skip_line(src.study_id, s) for s in skipped]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - one broken study must not end an archive run
        log.debug("study %s failed", src.study_id, exc_info=True)
        result["error"] = type(exc).__name__
        result["scans"] = []
        result["skipped"] = [_skip_line(src.study_id, Skipped("study", "failed", f"{type(exc).__name__}: {_safe_message(exc)}"))]
    result["peak_memory_mb"] = _peak_memory_mb()
    result["cpu_seconds"] = time.process_time() - cpu
    return result


def _peak_memory_mb() -> float | None:
    """Peak resident memory of this process so far (MB): Linux's VmHWM (it starts afresh in a new
    program, unlike ru_maxrss which a child inherits from the process that started it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError):  # pragma: no cover - Windows
        return None


def _store_scan(scan: Scan, settings: PreprocessSettings, study_dir: Path, out: Path, names: set) -> dict:
    array, transform = to_model_space(scan.image, scan.modality, settings)
    stored = to_storage(array, settings.storage)
    name = safe_name(scan.scan_id)
    while name in names:
        name += "_"
    names.add(name)
    npy = study_dir / f"{name}.npy"
    sidecar = study_dir / f"{name}.json"
    facts = {k: v for k, v in scan.header.items()}
    side = {"scan_id": scan.scan_id, "modality": scan.modality, "description": scan.description,
            "geometry": geometry(scan.image), "header": facts, "transform": transform,
            "settings": settings.to_dict(), "files": len(scan.files)}
    _atomic_npy(npy, stored)
    _atomic_write(sidecar, json.dumps(side, indent=1).encode("utf-8"))
    geo = side["geometry"]
    entry = {"scan_id": scan.scan_id, "path": npy.relative_to(out).as_posix(), "shape": list(stored.shape),
             "dtype": str(stored.dtype), "modality": scan.modality, "description": scan.description,
             "sidecar": sidecar.relative_to(out).as_posix(), "size": geo["size"], "spacing": geo["spacing"]}
    entry.update({k: facts[k] for k in _MANIFEST_FACTS if k in facts})
    return entry


# -- the archive -------------------------------------------------------------------------------------


def prepare_archive(source, out, settings: PreprocessSettings | dict | None = None, reports=None,
                    report_key: str = "study_id", report_column: str | None = "report", label_columns=None,
                    workers: int = 1, shard=(0, 1), progress: bool = True, report_match: str = "auto",
                    split_column: str | None = None, **options) -> dict:
    """Prepare every study under ``source`` into ``out`` (see manifest.py for the layout).

    source: a folder tree of DICOM files (any layout) and/or NIfTI/NRRD/MHA files (one folder = one
        study).
    settings: PreprocessSettings (or its dict); stored as out/preprocess.json. A folder prepared
        with other settings is refused.
    reports: CSV/TSV/JSON/JSONL with one row per study; ``report_key`` names its key column and
        ``report_match`` says what the key is ("study_id", "study_uid", "accession", "folder",
        "folder_name", or "auto": the first of these found); ``report_column`` the text column;
        ``label_columns`` 0/1 columns; ``split_column`` a train/valid/test column.
    workers: processes. shard: (I, N) or "I/N": this run prepares the studies whose id hashes to I
        (a shard writes manifest.shard-I-of-N.jsonl; merge_shards joins them).
    options: IngestOptions fields (min_slices, keep_derived, max_gap, repeated, ...).
    Returns a summary dict: studies, prepared, already_done, without_scans, failed, scans,
    skipped (count by reason), seconds, studies_per_second, complete.
    """
    start = time.perf_counter()
    settings = settings_like(settings)
    opts = IngestOptions.from_kwargs(options)
    shard = parse_shard(shard)
    workers = max(1, int(workers))
    if not Path(source).is_dir():
        raise FileNotFoundError(f"no source folder at {source}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _settings_file(out, settings)
    table = read_reports(reports, report_key, report_column, label_columns, split_column) if reports else None
    pool = worker_pool(workers) if workers > 1 else None
    try:
        return _prepare(source, out, settings, opts, table, report_match, shard, workers, progress, pool, options, start)
    finally:
        if pool is not None:
            pool.terminate()


def _prepare(source, out: Path, settings, opts, table, report_match, shard, workers, progress, pool, options, start) -> dict:
    manifest_name, skipped_name, summary_name = output_names(shard)
    manifest_file, skipped_file = out / manifest_name, out / skipped_name
    discovery = discover_studies(source, workers=workers, progress=progress, pool=pool, keep_headers=KEEP_HEADERS, **options)
    studies = [s for s in discovery.studies if in_shard(s.study_id, shard)]
    done, kept_skips = _resume_state(manifest_file, skipped_file)
    if shard[0] == 0:  # files in no study are reported once, by shard 0
        kept_skips += [_skip_line(None, s) for s in discovery.skipped]
    _atomic_write(skipped_file, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept_skips).encode("utf-8"))
    todo = [s for s in studies if s.study_id not in done]
    already = len(studies) - len(todo)
    if already:
        log.info("resuming: %d of %d studies already prepared", already, len(studies))

    counts: Counter = Counter(s.reason for s in discovery.skipped) if shard[0] == 0 else Counter()
    stats = Counter()
    tasks = (_task(s, discovery.root, out, settings, opts) for s in todo)
    by_id = {s.study_id: s for s in todo}
    bar = _bar(progress, len(todo), "preparing studies")
    try:
        results = pool.imap_unordered(prepare_study, tasks, chunksize=1) if pool is not None else map(prepare_study, tasks)
        for result in results:
            _record(result, studies_by_id=by_id, table=table, report_match=report_match,
                    manifest_file=manifest_file, skipped_file=skipped_file, counts=counts, stats=stats)
            bar.update(1)
            bar.set_postfix_str(f"scans {stats['scans']} skipped {sum(counts.values())}")
    finally:
        bar.close()
    if table is not None and stats["prepared"] and not stats["reports"]:
        log.warning("no prepared study matched a report: check report_key (the key column) and report_match "
                    "(what the key is: study_id, study_uid, accession, folder or folder_name)")
    complete = stats["prepared"] + stats["without_scans"] + already == len(studies)
    if complete:
        _sort_manifest(manifest_file)
    seconds = time.perf_counter() - start
    summary = {
        "shard": f"{shard[0]}/{shard[1]}", "studies": len(studies), "already_done": already,
        "prepared": stats["prepared"], "without_scans": stats["without_scans"], "failed": stats["failed"],
        "scans": stats["scans"], "skipped": dict(sorted(counts.items())),
        "reports_matched": stats["reports"], "seconds": round(seconds, 3),
        "studies_per_second": round((stats["prepared"] + stats["without_scans"]) / seconds, 3) if seconds > 0 else None,
        "workers": workers, "complete": complete, "manifest": manifest_name,
        "peak_worker_memory_mb": stats["peak_memory_mb"] or None,
        "cpu_seconds_per_study": round(stats["cpu_seconds"] / max(1, stats["prepared"] + stats["without_scans"]), 3),
    }
    _atomic_write(out / summary_name, json.dumps(summary, indent=1).encode("utf-8"))
    log.info("prepared %d studies (%d already done, %d without usable scans, %d failed), %d scans kept, skipped %s, "
             "%.1f s, %.2f studies/s", summary["prepared"], already, summary["without_scans"], summary["failed"],
             summary["scans"], summary["skipped"], seconds, summary["studies_per_second"] or 0.0)
    return summary


def _task(study: StudySource, root: str, out: Path, settings: PreprocessSettings, opts: IngestOptions) -> dict:
    """The task of one study; the headers discovery kept for it go with the task and leave the parent."""
    task = {"study": dict(vars(study)), "root": root, "out": str(out), "settings": settings.to_dict(), "options": vars(opts)}
    study.instances = None
    return task


def _settings_file(out: Path, settings: PreprocessSettings) -> None:
    path = out / SETTINGS
    if path.is_file():
        existing = PreprocessSettings.from_dict(json.loads(path.read_text()))
        if existing != settings:
            raise ValueError(f"{out} was prepared with other preprocessing settings ({path.name}: {existing.to_dict()}); "
                             "use a new output folder, or the same settings to resume")
        return
    _atomic_write(path, json.dumps(settings.to_dict(), indent=1).encode("utf-8"))


def _resume_state(manifest_file: Path, skipped_file: Path) -> tuple[set[str], list[dict]]:
    """Studies already done (in the manifest, or recorded as having no usable scan) and the skipped
    lines that belong to them (lines of unfinished studies and of files in no study are dropped:
    this run writes them again)."""
    done = {r["study_id"] for r in _complete_lines(manifest_file)}
    lines = _complete_lines(skipped_file)
    done |= {x["study_id"] for x in lines if x.get("kind") == "study" and x.get("reason") == "no_usable_scan"}
    return done, [x for x in lines if x.get("study_id") in done]


def _record(result: dict, studies_by_id: dict, table, report_match: str, manifest_file: Path, skipped_file: Path,
            counts: Counter, stats: Counter) -> None:
    sid = result["study_id"]
    stats["cpu_seconds"] += result.get("cpu_seconds", 0.0)
    if result.get("peak_memory_mb"):
        stats["peak_memory_mb"] = max(stats["peak_memory_mb"], result["peak_memory_mb"])
    for line in result["skipped"]:
        if line["kind"] != "study" or line["reason"] == "failed":
            counts[line["reason"]] += 1
    if result["error"]:
        stats["failed"] += 1
        log.warning("study %s failed (%s); it will be tried again by the next run", sid, result["error"])
        _append(skipped_file, result["skipped"])
        return
    if not result["scans"]:
        stats["without_scans"] += 1
        _append(skipped_file, result["skipped"])  # includes the study line that marks it done
        return
    record = {"study_id": sid, "scans": result["scans"], "report": None, "sentences": []}
    if table is not None:
        src = studies_by_id[sid]
        candidates = {"study_id": sid, "study_uid": result["study_uid"], "accession": result["accession"],
                      "folder": src.folder, "folder_name": Path(src.folder).name}
        row, _ = match_report(table, candidates, report_match)
        if row is not None:
            stats["reports"] += 1
            record["report"] = row.report
            record["sentences"] = split_sentences(row.report)
            if row.labels:
                record["labels"] = row.labels
            if row.split:
                record["split"] = row.split
    check_record(record, f"study {sid}")
    _append(skipped_file, result["skipped"])
    _append(manifest_file, [record])
    stats["prepared"] += 1
    stats["scans"] += len(result["scans"])


def _sort_manifest(path: Path) -> None:
    """Rewrite a finished manifest in study order (workers finish in any order)."""
    lines = _complete_lines(path)
    lines.sort(key=lambda r: r["study_id"])
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8"))


def merge_shards(out, parts: Iterable[str | os.PathLike] | None = None) -> dict:
    """Join the shard manifests of ``out`` (manifest.shard-I-of-N.jsonl, written by
    prepare_archive(..., shard=(I, N)) into ``out`` or into other folders listed in ``parts``)
    into out/manifest.jsonl and out/skipped.jsonl. Every shard 0..N-1 must be present and complete;
    a study appearing in two shards is an error. Array paths are rewritten relative to ``out``.
    Returns {"shards", "studies", "scans", "skipped"}."""
    out = Path(out)
    folders = [out] + [Path(p) for p in parts or []]
    found: dict[tuple[int, int], Path] = {}
    for folder in folders:
        for path in folder.glob("manifest.shard-*-of-*.jsonl"):
            m = re.fullmatch(r"manifest\.shard-(\d+)-of-(\d+)\.jsonl", path.name)
            if m:
                found[(int(m.group(1)), int(m.group(2)))] = path
    if not found:
        raise FileNotFoundError(f"no shard manifests (manifest.shard-I-of-N.jsonl) in {', '.join(map(str, folders))}")
    counts = {n for _, n in found}
    if len(counts) != 1:
        raise ValueError(f"shard manifests of different splits found: N in {sorted(counts)}")
    n = counts.pop()
    missing = [i for i in range(n) if (i, n) not in found]
    if missing:
        raise ValueError(f"shards {missing} of {n} are missing; run them first (--shard I/{n})")
    settings = None
    records, skipped, seen = [], [], {}
    for i in range(n):
        path = found[(i, n)]
        folder = path.parent
        summary = folder / f"summary.shard-{i}-of-{n}.json"
        if not summary.is_file() or not json.loads(summary.read_text()).get("complete"):
            raise ValueError(f"shard {i}/{n} in {folder} is not complete; run it again to finish it")
        s = json.loads((folder / SETTINGS).read_text()) if (folder / SETTINGS).is_file() else None
        if settings is None:
            settings = s
        elif s != settings:
            raise ValueError(f"shard {i}/{n} in {folder} was prepared with other preprocessing settings")
        for r in _complete_lines(path):
            if r["study_id"] in seen:
                raise ValueError(f"study {r['study_id']!r} is in shards {seen[r['study_id']]} and {i}")
            seen[r["study_id"]] = i
            if folder.resolve() != out.resolve():
                for scan in r["scans"]:
                    for key in ("path", "sidecar"):
                        if key in scan:
                            scan[key] = Path(os.path.relpath(folder / scan[key], out)).as_posix()
            records.append(r)
        skipped += _complete_lines(folder / f"skipped.shard-{i}-of-{n}.jsonl")
    records.sort(key=lambda r: r["study_id"])
    if settings is not None and not (out / SETTINGS).is_file():
        _atomic_write(out / SETTINGS, json.dumps(settings, indent=1).encode("utf-8"))
    _atomic_write(out / SKIPPED, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in skipped).encode("utf-8"))
    _atomic_write(out / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    summary = {"shards": n, "studies": len(records), "scans": sum(len(r["scans"]) for r in records),
               "skipped": dict(sorted(Counter(x["reason"] for x in skipped if x.get("kind") != "study").items()))}
    log.info("merged %d shards: %d studies, %d scans", n, summary["studies"], summary["scans"])
    return summary
