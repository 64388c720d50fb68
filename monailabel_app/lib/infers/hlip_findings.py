"""The findings task: free-text findings scored for a whole study, with optional heat maps.

One instance holds the loaded model (``hlip_core.inference.StudyPredictor``), a small memory of
recently prepared studies and of answers already given. Every method that touches the model runs
on the inference worker thread only (see ``lib/worker.py``).
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import struct
import threading
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask

from ..configs import HLIPConfig
from ..datastore.folder import volume_stem

log = logging.getLogger(__name__)

DESCRIPTION = ("HLIP zero-shot findings for a whole study (all its CT/MRI series): probability and score per "
               "free-text finding, the series that drives it, and optionally a heat map per finding")

# How heat maps travel (request params ``heatmap_format`` and ``heatmap_scans``; the first is the default)
HEATMAP_FORMATS = ("parts", "zip")  # one multipart file part per map, or all maps in one heatmaps.zip part
HEATMAP_SCANS = ("driving", "all")  # each finding's driving scan only, or every scan the model read
NIFTI1_HEADER = 348
SCL_SLOPE_AT = 112  # byte offsets of scl_slope and scl_inter (float32) in a NIfTI-1 header


class LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def get_item(self, key):
        with self.lock:
            if key not in self:
                return None
            self.move_to_end(key)
            return self[key]

    def put(self, key, value) -> None:
        if self.size <= 0:
            return
        with self.lock:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self.size:
                self.popitem(last=False)


class HLIPFindings(InferTask):
    def __init__(self, config: HLIPConfig):
        from hlip_core.inference import StudyPredictor

        predictor = StudyPredictor.load(config.checkpoint, device=config.device, precision=config.precision)
        probe = load_probe(config, predictor) if config.probe is not None else None
        super().__init__(type="hlip_findings", labels=list(config.findings), dimension=3, description=DESCRIPTION,
                         config={"heatmaps": config.heatmaps, "max_findings": config.max_findings,
                                 "heatmap_format": list(HEATMAP_FORMATS), "heatmap_scans": list(HEATMAP_SCANS),
                                 "heatmap_encoding": "uint8 NIfTI-1 (.nii.gz) with scl_slope/scl_inter: readers see float values",
                                 "probe": probe_info(probe)})
        self.conf = config
        self.predictor = predictor
        self.probe = probe  # a hlip_core.eval.probe.LinearProbe, or None
        self.prepared = LRU(config.prepared_cache)  # (study id, signature) -> PreparedStudy
        self.answers = LRU(8192)  # (study id, signature, finding) -> finding's JSON (without heat map)
        self.studies = LRU(1024)  # (study id, signature) -> {"scans": what the model read, "skipped": what it could not use}
        self.tmp = Path(config.cache_dir) / "tmp"

    def is_valid(self) -> bool:
        return True

    # -- on the worker thread -------------------------------------------------------------------

    def prepare(self, study, files_of):
        """A PreparedStudy for a catalog StudyEntry; ``files_of(study)`` gives its local files."""
        key = (study.study_id, study.signature)
        hit = None if study.temporary else self.prepared.get_item(key)
        if hit is not None:
            return hit
        prepared = self.predictor.prepare(self.load(study, files_of(study)), study_id=study.study_id)
        prepared.study_id = study.study_id  # the catalog's id (a folder name or StudyInstanceUID) is the one clients use
        if not study.temporary:
            self.prepared.put(key, prepared)
        return prepared

    def load(self, study, files: list[str]):
        """The study's files read by the ingestion, each volume file with its modality: the one its
        upload named, else ``--conf volume_modality`` (DICOM files carry their own)."""
        from hlip_core.data import Study, load_study

        named = {f: sc.modality for sc in study.scans if sc.modality for f in sc.files if volume_stem(os.path.basename(f))}
        groups: dict[str, list[str]] = {}
        for f in files:
            groups.setdefault(named.get(f, self.conf.volume_modality), []).append(f)
        if len(groups) <= 1:
            return load_study(files, volume_modality=next(iter(groups), self.conf.volume_modality), max_voxels=self.conf.max_voxels)
        # one ingestion per modality, merged in the order of the files
        loaded = [load_study(group, volume_modality=modality, max_voxels=self.conf.max_voxels) for modality, group in groups.items()]
        position = {f: i for i, f in enumerate(files)}
        scans = sorted((sc for part in loaded for sc in part.scans), key=lambda sc: min(position.get(f, 0) for f in sc.files or [""]))
        return Study(study.study_id, scans=scans, skipped=[s for part in loaded for s in part.skipped])

    def embed(self, study, files_of) -> np.ndarray:
        """The study's normalised report embedding [E] for the search index (the model's last token,
        ``encode_study_for_reports``: search texts are compared with it, as reports were in training)."""
        return self.predictor.embed(self.prepare(study, files_of), embedding="reports")[0]

    def predict(self, study, files_of, findings: list[str], heatmaps: bool, all_scans: bool = False) -> Tuple[dict, list]:
        """JSON answer and, with heat maps, [(part name, NIfTI .nii.gz bytes)] in finding order.
        The answer: study_id, findings (one row per finding), scans (each scan the model read, with
        the modality it was preprocessed as), skipped (series the ingestion could not use, why).
        With heat maps each row names its driving scan's map (``heatmap``); with ``all_scans`` also
        every scan's (``heatmaps``: {scan_id: part name}). Maps are ``quantised_nifti`` files."""
        prepared = self.prepare(study, files_of)
        result = self.predictor.predict(prepared, findings, heatmaps=heatmaps)
        probe = self.probe_answer(result.embedding)
        scans = [{"scan_id": sc.scan_id, "image_id": _image_id_of(sc, study), "description": sc.description, "modality": sc.modality}
                 for sc in prepared.scans]
        by_id = {sc["scan_id"]: sc for sc in scans}
        about = {"scans": scans, "skipped": [str(s) for s in prepared.skipped]}
        if probe is not None:
            about["probe"] = probe
        if not study.temporary:
            self.studies.put((study.study_id, study.signature), about)
        rows, parts = [], []
        for j, f in enumerate(result.findings):
            scan = by_id[f.scan_id]
            row = {"finding": f.finding, "probability": f.probability, "score": f.score, "scan_id": f.scan_id,
                   "scan_description": f.scan_description, "scan_modality": scan["modality"], "image_id": scan["image_id"]}
            if not study.temporary:
                self.answers.put((study.study_id, study.signature, f.finding), dict(row))
            if heatmaps:
                row["heatmap"] = f"heatmap_{j}"
                parts.append((row["heatmap"], quantised_nifti(result.heatmaps[f.finding], self.tmp)))
                if all_scans:
                    row["heatmaps"] = {}
                    for i, (scan_id, image) in enumerate(result.all_heatmaps[f.finding].items()):
                        if scan_id == f.scan_id:
                            row["heatmaps"][scan_id] = row["heatmap"]
                            continue
                        row["heatmaps"][scan_id] = f"heatmap_{j}_scan{i}"
                        parts.append((row["heatmaps"][scan_id], quantised_nifti(image, self.tmp)))
            rows.append(row)
        return {"study_id": study.study_id, "findings": rows, **about}, parts

    def cached(self, study, findings: list[str]) -> dict | None:
        """The JSON answer from memory when every finding was answered for this study before."""
        if study.temporary:
            return None
        rows = [self.answers.get_item((study.study_id, study.signature, f)) for f in findings]
        about = self.studies.get_item((study.study_id, study.signature))
        if about is None or any(r is None for r in rows):
            return None
        answer = {"study_id": study.study_id, "findings": [dict(r) for r in rows], "scans": [dict(s) for s in about["scans"]],
                  "skipped": list(about["skipped"])}
        if "probe" in about:
            answer["probe"] = {**about["probe"], "findings": [dict(r) for r in about["probe"]["findings"]]}
        return answer

    def probe_answer(self, embedding) -> dict | None:
        """The linear probe's part of a findings answer for a study's findings embedding [E]:
        {"kind": "linear probe", "embedding", "findings": [{"finding", "probability"}] in the
        probe's order}; None without --conf probe. Apart from the zero-shot rows: the probe answers
        its own fixed findings, whatever the request asked."""
        if self.probe is None:
            return None
        p = self.probe.probabilities(np.asarray(embedding)[None])[0]
        return {"kind": "linear probe", "embedding": self.probe.embedding,
                "findings": [{"finding": n, "probability": float(v)} for n, v in zip(self.probe.names, p)]}

    # -- MONAI Label's own entry (batch infer, the ``monailabel`` CLI) ---------------------------------

    def __call__(self, request) -> Tuple[Union[str, None], Dict]:
        from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

        # MONAI Label would hand over one image file; findings are for whole studies, on the worker
        raise MONAILabelException(MONAILabelError.INVALID_INPUT, "hlip_findings scores whole studies: use "
                                  "POST /infer/hlip_findings?image=<image or study id> (or session_id=<upload session>)")


def load_probe(config: HLIPConfig, predictor):
    """The LinearProbe of ``--conf probe``, checked against the served checkpoint (its weights'
    fingerprint and embedding width); raises ValueError saying what does not match."""
    from hlip_core.eval.probe import LinearProbe, checkpoint_fingerprint

    try:
        return LinearProbe.load(config.probe, fingerprint=checkpoint_fingerprint(config.checkpoint),
                                embed_dim=int(predictor.model.config["embed_dim"]))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--conf probe: {e}") from None


def probe_info(probe) -> dict | None:
    """What /info/ says of the probe: its findings, the ones it skipped and why, its embedding and
    its held-out macro AUC (as train/probe.py measured it); None without one."""
    if probe is None:
        return None
    macro = (probe.info.get("held_out") or {}).get("macro_auc")
    finite = isinstance(macro, (int, float)) and np.isfinite(macro)  # JSON answers carry no NaN
    return {"findings": list(probe.names), "skipped": dict(probe.skipped), "embedding": probe.embedding,
            "held_out_macro_auc": float(macro) if finite else None}


def quantised_nifti(image, tmp: Path) -> bytes:
    """A heat map (SimpleITK image, float) as .nii.gz bytes: uint8 voxels q with the NIfTI-1 scale
    (scl_slope s, scl_inter lo), so that every NIfTI reader (ITK, so 3D Slicer and SimpleITK;
    nibabel) reads back float32 values q*s+lo within s/2 of the map (s = (max-min)/255), on the
    scan's own grid. ``tmp``: a folder for SimpleITK's file (removed afterwards). Raises
    ValueError for a map with non-finite values."""
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(values).all():
        raise ValueError("a heat map has non-finite values (NaN or inf); the model's output cannot be sent")
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0  # a constant map: all voxels 0, read back as lo
    codes = sitk.GetImageFromArray(np.clip(np.rint((values - lo) / scale), 0, 255).astype(np.uint8))
    codes.CopyInformation(image)
    folder = tmp / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        path = folder / "heatmap.nii"
        sitk.WriteImage(codes, str(path), False)
        data = bytearray(path.read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if struct.unpack("<i", data[:4])[0] != NIFTI1_HEADER:
        raise ValueError("SimpleITK wrote the heat map as a NIfTI file this server cannot scale (not NIfTI-1, little-endian)")
    data[SCL_SLOPE_AT : SCL_SLOPE_AT + 8] = struct.pack("<ff", scale, lo)
    return gzip.compress(bytes(data), compresslevel=6)


def _image_id_of(scan, study) -> str | None:
    """The datastore image (or uploaded file) a PreparedScan of the ingestion came from: the catalog
    scan holding its files, else the series whose UID it carries ("<uid>" or "<uid>_<k>" when the
    ingestion split a series into several volumes; DICOMweb scans have no local files in the catalog)."""
    files = set(scan.files)
    for sc in study.scans:
        if files & set(sc.files):
            return sc.image_id
    for sc in study.scans:
        uid = sc.series_uid
        if uid and (scan.scan_id == uid or scan.scan_id.startswith(uid + "_") and scan.scan_id[len(uid) + 1:].isdigit()):
            return sc.image_id
    return None
