"""Studies from folders or file lists: load_study (one study, in memory) and discover_studies (an
archive, grouped by StudyInstanceUID or by folder, headers only)."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .dicom import AssemblyError, HeaderError, Instance, VolumePlan, assemble, plan_series, read_header
from .types import IngestOptions, Scan, Skipped, Study
from .limits import VolumeInconsistent, VolumeTooLarge, check_volume_file

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
COMPANION_SUFFIXES = (".raw", ".zraw", ".raw.gz", ".img", ".img.gz")  # data files of .mhd/.nhdr headers


def volume_suffix(path: str | os.PathLike) -> str | None:
    """The volume-file suffix of ``path`` (".nii.gz", ".nrrd", ...) or None."""
    name = str(path).lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def volume_stem(path: str | os.PathLike) -> str:
    """A volume file's name without its suffix: its scan_id."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else Path(name).stem


def list_files(source: str | os.PathLike) -> list[str]:
    """Every regular file under ``source`` (recursively, sorted, dot-files and dot-folders left out,
    companion data files of .mhd/.nhdr headers left out)."""
    root = Path(source)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise FileNotFoundError(f"no file or folder at {source}")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        headers = {volume_stem(f) for f in files if volume_suffix(f) in (".mhd", ".nhdr")}
        for name in sorted(files):
            if name.startswith("."):
                continue
            lower = name.lower()
            if headers and any(lower.endswith(s) for s in COMPANION_SUFFIXES) and name.split(".")[0] in headers:
                continue
            out.append(os.path.join(folder, name))
    return out


def _rel(path: str, root: str | None) -> str:
    if root:
        try:
            return os.path.relpath(path, root)
        except ValueError:
            pass
    return path


def hashed_id(text: str) -> str:
    """A short stable id for a UID or a path (no information about the original)."""
    return "s" + hashlib.sha256(text.encode()).hexdigest()[:16]


# -- planning a study -----------------------------------------------------------------------------


@dataclass
class StudyPlan:
    """What a study holds before any pixel is read: DICOM volumes to assemble, volume files to
    read, and what was skipped already."""

    study_id: str
    dicom: list[VolumePlan] = field(default_factory=list)
    volume_files: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    study_uid: str | None = None
    accession_number: str | None = None

    def scan_count(self) -> int:
        return len(self.dicom) + len(self.volume_files)


def classify(files: Iterable[str], root: str | None = None,
             known: dict[str, Instance] | None = None) -> tuple[list[Instance], list[str], list[Skipped]]:
    """Split files into DICOM instances (headers read, or taken from ``known``: path -> Instance
    read before), volume files, and skipped files; instances in the order of ``files``."""
    instances, volumes, skipped = [], [], []
    known = known or {}
    for path in files:
        if volume_suffix(path):
            volumes.append(path)
            continue
        inst = known.get(path)
        if inst is not None:
            instances.append(inst)
            continue
        try:
            instances.append(read_header(path))
        except HeaderError as exc:
            skipped.append(Skipped("file", exc.reason, exc.detail, files=[_rel(path, root)]))
    return instances, volumes, skipped


def plan_study(files: Sequence[str], options: IngestOptions, study_id: str | None = None, root: str | None = None,
               folder_name: str | None = None, instances: list[Instance] | None = None) -> StudyPlan:
    """Read the headers of one study's files and plan its volumes. ``instances``: headers read
    before (by discovery) for some or all of ``files``; only the other files are read. Several
    StudyInstanceUIDs among the files raise ValueError naming the count."""
    instances, volumes, skipped = classify(files, root, {i.path: i for i in instances or ()})
    uids = sorted({i.study_uid for i in instances})
    if len(uids) > 1:
        raise ValueError(f"{len(uids)} different StudyInstanceUIDs in one source; load_study takes one study "
                         "(use discover_studies or prepare_archive for an archive)")
    study_uid = uids[0] if uids else None
    if study_id is None:
        if study_uid and options.study_ids == "uid":
            study_id = study_uid
        elif study_uid and options.study_ids == "hash":
            study_id = hashed_id(study_uid)
        else:
            study_id = folder_name or "study"
    accession = next((i.accession for i in instances if i.accession), None)
    plan = StudyPlan(study_id, study_uid=study_uid, accession_number=accession, skipped=skipped,
                     volume_files=sorted(volumes, key=lambda p: (volume_stem(p), p)))
    series: dict[str, list[Instance]] = {}
    for inst in instances:
        series.setdefault(inst.series_uid, []).append(inst)

    def series_order(item):
        insts = item[1]
        number = min((i.series_number for i in insts if i.series_number is not None), default=1 << 30)
        return (number, item[0])

    for uid, insts in sorted(series.items(), key=series_order):
        plans, skipped_here = plan_series(insts, options)
        plan.dicom.extend(plans)
        for s in skipped_here:
            s.files = [_rel(f, root) for f in s.files]
            if s.kept:
                s.kept = _rel(s.kept, root)
        plan.skipped.extend(skipped_here)
    return plan


def iter_scans(plan: StudyPlan, options: IngestOptions, root: str | None = None) -> Iterator[Scan | Skipped]:
    """Assemble a planned study one volume at a time (memory: one series), yielding Scans, or
    Skipped for volumes whose pixels could not be read."""
    for vp in plan.dicom:
        try:
            image = assemble(vp)
        except AssemblyError as exc:
            where = f"{exc.detail} in {Path(exc.path).name}" if exc.path else exc.detail
            yield Skipped("series", exc.reason, where, vp.series_number, vp.description, vp.series_uid,
                          [_rel(f, root) for f in vp.files])
            continue
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged series must not stop the study
            log.debug("series %s failed", vp.series_number, exc_info=True)
            yield Skipped("series", "undecodable", type(exc).__name__, vp.series_number, vp.description, vp.series_uid,
                          [_rel(f, root) for f in vp.files])
            continue
        scan = Scan(vp.scan_id, vp.modality, vp.description, image, vp.files, dict(vp.header))
        del image  # the caller decides how long the volume lives (prepare_archive: one at a time)
        yield scan
        del scan
    for path in plan.volume_files:
        yield from read_volume_file(path, options, root)


def read_volume_file(path: str, options: IngestOptions, root: str | None = None) -> Iterator[Scan | Skipped]:
    """One NIfTI/NRRD/MHA file -> Scan(s) (a 4D file is split like a repeated DICOM series)."""
    import numpy as np
    import SimpleITK as sitk

    stem = volume_stem(path)
    rel = _rel(path, root)

    def skip(reason: str, detail: str, kind: str = "file") -> Skipped:
        return Skipped(kind, reason, detail, None, stem, stem, [rel])

    try:  # NIfTI: size against the limit, data length and finiteness, before anything is allocated
        check_volume_file(path, options.max_voxels, what="the volume file")
    except VolumeTooLarge as exc:
        yield skip("too_large", str(exc))
        return
    except VolumeInconsistent as exc:
        yield skip(exc.reason, str(exc))
        return
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        dim, comps, size = reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize()
        voxels = 1
        for n in size:
            voxels *= int(n)
        if voxels > options.max_voxels:  # NRRD/MHA: the header's size against the same limit
            yield skip("too_large", f"{voxels:,} voxels; the limit is {options.max_voxels:,} (max_voxels)")
            return
        if comps != 1:
            yield skip("colour", f"{comps} components per voxel")
            return
        if dim < 3 or (dim >= 3 and size[2] < options.min_slices):
            yield skip("too_few_slices", f"size {tuple(size)}")
            return
        image = reader.Execute()
    except RuntimeError as exc:
        yield skip("unreadable_volume", str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "SimpleITK could not read it")
        return
    images = [image]
    if dim == 4:
        n = size[3]
        chosen = list(range(n))
        if options.repeated == "first":
            chosen = [0]
        elif options.repeated == "last":
            chosen = [n - 1]
        elif n > options.max_volumes:
            chosen = list(range(options.max_volumes))
        if len(chosen) < n:
            yield skip("volume_not_selected", f"{n} volumes; kept {len(chosen)} by option repeated={options.repeated!r}", kind="volume")
        images = [sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, t]) for t in chosen]
        del image
    elif dim > 4:
        yield skip("unreadable_volume", f"{dim} dimensions")
        return
    modality = options.volume_modality
    for k, img in enumerate(images):
        if modality == "auto":
            arr = sitk.GetArrayViewFromImage(img)
            sample = np.asarray(arr).ravel()[:: max(1, arr.size // 200000)]
            mod = "CT" if np.percentile(sample, 1) < -500 else "MR"
        else:
            mod = modality
        scan_id = stem if len(images) == 1 else f"{stem}_{k + 1}"
        header = {"file": Path(path).name}
        if len(images) > 1:
            header["volume"] = f"{k + 1}/{len(images)}"
        yield Scan(scan_id, mod, stem, img, [str(path)], header)


def load_study(source, study_id: str | None = None, **options) -> Study:
    """One study in memory.

    source: a folder (a DICOM tree of one study in any layout, or a folder of NIfTI/NRRD/MHA files,
        one file = one scan), or a list of file paths (DICOM files of one study, or volume files).
    study_id: the id to give the study (default: StudyInstanceUID for DICOM, else the folder name).
    options: IngestOptions fields (min_slices, keep_derived, max_gap, repeated, max_volumes,
        volume_modality, study_ids).
    Returns a Study whose scans hold SimpleITK images in their original geometry; series that are
    not usable volumes are in ``study.skipped`` with their reasons (never raised). Several
    StudyInstanceUIDs in one source raise ValueError.
    """
    opts = IngestOptions.from_kwargs(options)
    if isinstance(source, (str, os.PathLike)):
        root = str(source) if Path(source).is_dir() else str(Path(source).parent)
        files = list_files(source)
        folder_name = Path(source).name if Path(source).is_dir() else Path(source).parent.name
    else:
        files = [str(f) for f in source]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(files)} files do not exist (first: {missing[0]})")
        parents = {str(Path(f).parent) for f in files}
        root = os.path.commonpath(list(parents)) if parents else None
        folder_name = Path(root).name if root else None
    plan = plan_study(files, opts, study_id, root=root, folder_name=folder_name)
    study = Study(plan.study_id, skipped=list(plan.skipped), study_uid=plan.study_uid, accession_number=plan.accession_number)
    for item in iter_scans(plan, opts, root):
        (study.scans if isinstance(item, Scan) else study.skipped).append(item)
    if not study.scans:
        log.info("study %s: no usable scan (%d skipped)", study.study_id, len(study.skipped))
    return study


# -- archives -------------------------------------------------------------------------------------


@dataclass
class StudySource:
    """One study of an archive: its id, its files (absolute paths, sorted) and how it was found."""

    study_id: str
    files: list[str]
    kind: str  # "dicom" | "volumes" | "mixed"
    folder: str  # the folder holding its files, relative to the archive root
    study_uid: str | None = None
    # headers discovery read and kept (for some or all of its DICOM files; see discover_studies)
    instances: list[Instance] | None = None


@dataclass
class Discovery:
    """The studies of an archive and the files that belong to none (not DICOM, unreadable)."""

    root: str
    studies: list[StudySource]
    skipped: list[Skipped]

    def __iter__(self):
        return iter(self.studies)

    def __len__(self) -> int:
        return len(self.studies)


# Headers prepare_archive keeps from discovery so that planning does not read those files again:
# about 4 KB each in memory, so at most ~64 MB; files beyond this many are read again when their
# study is planned (memory stays flat in the size of the archive).
KEEP_HEADERS = 16384


def _study_key_of(path: str) -> Instance | str | Skipped:
    """What discovery needs of one file: its Instance (DICOM), its folder (a volume file) or
    Skipped (not usable)."""
    if volume_suffix(path):
        return str(Path(path).parent)
    try:
        return read_header(path)
    except HeaderError as exc:
        return Skipped("file", exc.reason, exc.detail, files=[path])


def study_keys(paths: Sequence[str]) -> list:
    """_study_key_of for a chunk of files (run in worker processes)."""
    return [_study_key_of(p) for p in paths]


def discover_studies(source: str | os.PathLike, workers: int = 1, progress: bool = False, pool=None,
                     keep_headers: int = 0, **options) -> Discovery:
    """Group the files of an archive into studies, reading DICOM headers only (never pixel data).

    DICOM files are grouped by StudyInstanceUID wherever they lie; NIfTI/NRRD/MHA files by the
    folder holding them (one folder = one study). Study ids follow ``study_ids`` (see IngestOptions):
    DICOM studies get their UID (or its hash, or their folder), volume folders their path relative
    to ``source`` ("/"-separated; the source's own name for files directly in it).
    workers: processes reading headers (or ``pool``: a multiprocessing pool to use).
    keep_headers: keep the Instances of up to this many DICOM files in ``StudySource.instances``
        (plan_study then reads only the others); 0 keeps none.
    Returns a Discovery: ``.studies`` sorted by id, ``.skipped`` files that are in no study.
    """
    opts = IngestOptions.from_kwargs(options)
    root = str(Path(source).resolve())
    files = list_files(root)
    # results are consumed as the workers deliver them: an Instance beyond the keep budget is
    # dropped at once (only its study key is kept), so memory stays flat in the number of files
    keys = _iter_chunks(study_keys, files, workers, progress, "reading headers", pool=pool)
    groups: dict[tuple[str, str], list[str]] = {}
    kept: dict[tuple[str, str], list[Instance]] = {}
    skipped = []
    budget = max(0, int(keep_headers))
    for found, path in zip(keys, files):  # keys first: the generator runs to its end (pool closed)
        if isinstance(found, Skipped):
            found.files = [_rel(path, root)]
            skipped.append(found)
            continue
        key = ("volumes", found) if isinstance(found, str) else ("dicom", found.study_uid)
        groups.setdefault(key, []).append(path)
        if isinstance(found, Instance) and budget:
            kept.setdefault(key, []).append(found)
            budget -= 1
    studies: list[StudySource] = []
    used: dict[str, int] = {}
    for (kind, key), paths in groups.items():
        folder = os.path.commonpath([str(Path(p).parent) for p in paths])
        rel_folder = Path(os.path.relpath(folder, root)).as_posix()
        if kind == "volumes":
            sid = rel_folder if rel_folder != "." else Path(root).name
            if opts.study_ids == "hash":
                sid = hashed_id(sid)
            uid = None
        else:
            uid = key
            sid = {"uid": uid, "hash": hashed_id(uid), "folder": rel_folder if rel_folder != "." else Path(root).name}[opts.study_ids]
        used[sid] = used.get(sid, 0) + 1
        studies.append(StudySource(sid, sorted(paths), kind, rel_folder, uid, kept.pop((kind, key), None)))
    # two studies claiming one id (two DICOM studies in one folder with study_ids="folder",
    # or DICOM and volume files in one folder): make them distinct and say so
    for st in studies:
        if used[st.study_id] > 1:
            new = f"{st.study_id}_{hashed_id(st.study_uid or st.kind)[1:9]}"
            log.warning("study id %r is shared by %d studies; one of them becomes %r", st.study_id, used[st.study_id], new)
            st.study_id = new
    studies.sort(key=lambda s: s.study_id)
    log.info("discovered %d studies in %d files (%d files in no study)", len(studies), len(files), len(skipped))
    return Discovery(root, studies, skipped)


def _iter_chunks(fn, items: list, workers: int, progress: bool, what: str, chunk: int = 256, pool=None):
    """fn over chunks of items, in worker processes when a pool is given or workers > 1 (and there
    is more than one chunk); yields the results one by one, in order, as the chunks complete."""
    chunks = [items[i: i + chunk] for i in range(0, len(items), chunk)]
    bar = _bar(progress, len(items), what)
    own = None
    try:
        if pool is None and workers > 1 and len(chunks) > 1:
            pool = own = worker_pool(workers)
        parts = pool.imap(fn, chunks) if pool is not None and len(chunks) > 1 else map(fn, chunks)
        for part in parts:
            bar.update(len(part))
            yield from part
    finally:
        bar.close()
        if own is not None:
            own.terminate()


def _worker_init() -> None:
    # one BLAS thread per worker process: N workers on N cores, no oversubscription
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - numpy then uses its default threads
        pass


def worker_pool(workers: int):
    """A process pool for ingestion.

    Linux: workers are forked from the caller, so they start at once with everything imported
    (spawned workers spent 2-3 s importing torch through hlip_core before their first study). The
    work they do is fork-safe: numpy (OpenBLAS resets its threads at fork), SimpleITK (ITK's
    thread pool registers pthread_atfork handlers), pydicom and plain Python; they run no torch or
    OpenMP code. Elsewhere (macOS, Windows) workers are spawned.
    """
    import multiprocessing as mp
    import sys

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    return ctx.Pool(workers, initializer=_worker_init)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: int, what: str):
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="file" if "header" in what else "study", dynamic_ncols=True)
