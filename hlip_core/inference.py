"""One entry point for using a trained model: studies in, findings, embeddings and heat maps out.

    predictor = StudyPredictor.load("checkpoints/mine")          # or device="cuda", precision="bf16"
    study = predictor.prepare("path/to/study_folder")            # DICOM or NIfTI; or a list of files
    result = predictor.predict(study, ["intracranial haemorrhage", "midline shift"], heatmaps=True)
    result.findings[0].probability, result.heatmaps["midline shift"]   # SimpleITK image, scan geometry

Studies are preprocessed exactly as in training: the ingestion settings travel inside the
checkpoint (``model.config["preprocess"]``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .eval.embedding import study_encoder
from .eval.saliency import relevance_maps
from .eval.zeroshot import Finding, ZeroShotClassifier, findings_from_text
from .model import HLIPModel, autocast, load

log = logging.getLogger(__name__)


class NoUsableScanError(ValueError):
    """A study in which no series could be used as a volume; the message lists why each was skipped."""


@dataclass
class PreparedScan:
    scan_id: str
    modality: str
    description: str
    image: object  # SimpleITK.Image in the scan's original geometry
    array: np.ndarray  # [D, H, W] model grid, float32 in [0, 1]
    transform: dict  # to map model-grid maps back onto ``image``
    files: list = field(default_factory=list)  # the files it was read from (empty for in-memory images)


@dataclass
class PreparedStudy:
    study_id: str
    scans: list[PreparedScan]
    skipped: list = field(default_factory=list)
    # what the model's last block reads, per (model, device, precision): new findings on a study
    # kept in memory re-run only that block (a twelfth of ViT-B's work)
    last_block_input: dict = field(default_factory=dict, repr=False, compare=False)

    def tensor(self) -> torch.Tensor:
        """[1, N, 1, D, H, W] float32."""
        return torch.from_numpy(np.stack([s.array for s in self.scans]))[None, :, None].float()


@dataclass
class FindingResult:
    finding: str
    probability: float
    score: float  # cosine to the positive prompt minus cosine to the negative prompt
    scan_id: str  # the scan that carries most of the finding's relevance
    scan_description: str


@dataclass
class StudyResult:
    study_id: str
    findings: list[FindingResult]
    heatmaps: dict = field(default_factory=dict)  # finding -> SimpleITK image on its driving scan
    all_heatmaps: dict = field(default_factory=dict)  # finding -> {scan_id: SimpleITK image}
    embedding: np.ndarray | None = None  # the study's normalised findings embedding [E] (token 0) the scores came from


class StudyPredictor:
    """A loaded model with its preprocessing, a prompt cache, and the study-level operations."""

    def __init__(self, model: HLIPModel, device: str | torch.device = "cpu", precision: str = "fp32", templates: Sequence[str] | None = None):
        from .data.preprocess import PreprocessSettings

        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.precision = precision
        autocast(self.device, precision)  # validates the name now, not at the first request
        pre = model.config.get("preprocess")
        if pre:
            self.settings = PreprocessSettings.from_dict(pre)
        else:
            self.settings = PreprocessSettings(target_shape=tuple(model.config["vision"]["img_size"]))
            log.warning("checkpoint carries no preprocessing settings; using defaults for a %s grid", self.settings.target_shape)
        self.classifier = ZeroShotClassifier(model, templates=list(templates) if templates else None)

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32", **kwargs) -> "StudyPredictor":
        return cls(load(checkpoint, device="cpu"), device=device, precision=precision, **kwargs)

    # -- studies --------------------------------------------------------------------------------

    def prepare(self, source, study_id: str | None = None, **options) -> PreparedStudy:
        """A study from a folder (DICOM or NIfTI/NRRD/MHA), a list of files, a ``hlip_core.data.Study``
        already loaded, or a list of SimpleITK images (with ``study_id``). ``options`` go to
        ``load_study`` (e.g. ``volume_modality="auto"``). Raises NoUsableScanError when nothing is usable."""
        from .data import Study, load_study
        from .data.preprocess import to_model_space

        if isinstance(source, PreparedStudy):
            return source
        if isinstance(source, (list, tuple)) and source and not isinstance(source[0], (str, os.PathLike)):
            images = list(source)
            scans_in = [(f"scan{i}", "MR", "", img, []) for i, img in enumerate(images)]
            sid, skipped = study_id or "study", []
        else:
            study = source if isinstance(source, Study) else load_study(source, **options)
            scans_in = [(s.scan_id, s.modality, s.description, s.image, list(s.files)) for s in study.scans]
            sid, skipped = study_id or study.study_id, list(study.skipped)
        if not scans_in:
            reasons = "; ".join(str(s) for s in skipped[:10]) or "no image files found"
            raise NoUsableScanError(f"study {sid} has no usable scan ({reasons})")
        scans = []
        for scan_id, modality, description, image, files in scans_in:
            array, transform = to_model_space(image, modality, self.settings)  # float32 [D, H, W] in [0, 1]
            scans.append(PreparedScan(scan_id, modality, description, image, array, transform, files))
        return PreparedStudy(sid, scans, skipped)

    # -- embeddings and findings ----------------------------------------------------------------

    @torch.no_grad()
    def embed(self, studies: PreparedStudy | Sequence[PreparedStudy], embedding: str = "reports") -> np.ndarray:
        """Normalised study embeddings [B, E] (several studies run as one padded batch).

        embedding: "reports" (default; the search embedding, ``encode_study_for_reports``: the last
        token, compared with report texts at ``report_scale()``) or "findings" (``encode_study``:
        token 0, the one zero-shot findings and linear probes use). The same for single-token models."""
        if isinstance(studies, PreparedStudy):
            studies = [studies]
        encode = study_encoder(self.model, embedding)
        x, mask = batch_studies(studies)
        with autocast(self.device, self.precision):
            z = encode(x.to(self.device), mask.to(self.device))
        return F.normalize(z.float(), dim=-1).cpu().numpy()

    def _findings(self, findings) -> list[Finding]:
        if not findings:
            raise ValueError("no findings given; ask for at least one, e.g. 'intracranial haemorrhage'")
        if all(isinstance(f, Finding) for f in findings):
            return list(findings)
        return findings_from_text(list(findings))

    @torch.no_grad()
    def score(self, embeddings: np.ndarray, findings) -> dict[str, np.ndarray]:
        """Findings for embedded studies: {"probability": [B, F], "score": [B, F]}."""
        items = self._findings(findings)
        with autocast(self.device, self.precision):
            out = self.classifier.scores(torch.as_tensor(np.asarray(embeddings)), items)
        return {"probability": out["probability"].float().numpy(), "score": out["cosine"].float().numpy()}

    def text_directions(self, findings: list[Finding]) -> torch.Tensor:
        """Positive minus negative prompt embedding per finding: [F, E]."""
        with torch.no_grad(), autocast(self.device, self.precision):
            pos = self.classifier.embed_prompts([f.positive for f in findings])
            neg = self.classifier.embed_prompts([f.negative for f in findings])
        return (pos - neg).float()

    def predict(self, source, findings, heatmaps: bool = False) -> StudyResult:
        """Score ``findings`` (free text or Finding objects) for one study; optionally with heat maps
        as SimpleITK images in the original geometry of each scan."""
        items = self._findings(findings)  # checked before any work on the study
        study = self.prepare(source)
        maps, shares, z = self._relevance(study, items)  # one forward pass: embedding and relevance
        scores = self.score(z[None], items)
        results, drivers = [], {}
        for j, f in enumerate(items):
            k = int(shares[j].argmax())
            drivers[f.name] = k
            results.append(FindingResult(f.name, float(scores["probability"][0, j]), float(scores["score"][0, j]),
                                         study.scans[k].scan_id, study.scans[k].description))
        out = StudyResult(study.study_id, results, embedding=z)
        if heatmaps:
            for j, f in enumerate(items):
                per_scan = {s.scan_id: self._to_scan(maps[j, i], s) for i, s in enumerate(study.scans)}
                out.all_heatmaps[f.name] = per_scan
                out.heatmaps[f.name] = per_scan[study.scans[drivers[f.name]].scan_id]
        return out

    def _relevance(self, study: PreparedStudy, items: list[Finding]):
        """(maps [F, V, D, H, W], scan shares [F, V], normalised study embedding [E]) as numpy."""
        key = (id(self.model), str(self.device), self.precision)
        state = study.last_block_input.get(key)
        x = None if state is not None else study.tensor().to(self.device)
        with autocast(self.device, self.precision):
            maps, shares, z, state = relevance_maps(self.model, x, None, self.text_directions(items).to(self.device),
                                                    return_embedding=True, state=state)
        study.last_block_input[key] = state
        return maps.float().cpu().numpy(), shares.float().cpu().numpy(), F.normalize(z.float(), dim=-1).cpu().numpy()

    @staticmethod
    def _to_scan(model_map: np.ndarray, scan: PreparedScan):
        from .data.preprocess import to_scan_space

        return to_scan_space(model_map.astype(np.float32), scan.transform)


def batch_studies(studies: Sequence[PreparedStudy]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad studies to one batch: x [B, N, 1, D, H, W] and scan_mask [B, N] (True = real scan)."""
    if not studies:
        raise ValueError("no studies to embed")
    shapes = {s.array.shape for st in studies for s in st.scans}
    if len(shapes) != 1:
        raise ValueError(f"all scans must share the model grid to be batched, got {sorted(shapes)}")
    n = max(len(st.scans) for st in studies)
    d, h, w = shapes.pop()
    x = torch.zeros(len(studies), n, 1, d, h, w)
    mask = torch.zeros(len(studies), n, dtype=torch.bool)
    for i, st in enumerate(studies):
        x[i, : len(st.scans)] = st.tensor()[0]
        mask[i, : len(st.scans)] = True
    return x, mask


def save_heatmap_png(image, heatmap, path: str | Path, title: str = "") -> Path:
    """A quick look: three orthogonal mid-planes through the heat map's maximum, overlaid on the scan.
    image, heatmap: SimpleITK images of the same geometry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    vol = sitk.GetArrayFromImage(image).astype(np.float32)
    hm = sitk.GetArrayFromImage(heatmap).astype(np.float32)
    k, j, i = np.unravel_index(int(np.argmax(hm)), hm.shape)
    lo, hi = np.percentile(vol, [1, 99])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=100)
    for ax, (v, m) in zip(axes, [(vol[k], hm[k]), (vol[:, j], hm[:, j]), (vol[:, :, i], hm[:, :, i])]):
        ax.imshow(v, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        ax.imshow(np.ma.masked_less(m, 0.2), cmap="hot", alpha=0.5, vmin=0, vmax=1, origin="lower")
        ax.axis("off")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
