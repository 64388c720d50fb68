"""Ingestion: DICOM and NIfTI/NRRD/MHA studies to model-ready arrays, manifests and back.

    from hlip_core.data import load_study, PreprocessSettings, to_model_space, to_scan_space
    study = load_study("path/to/study")          # Study: .scans (SimpleITK images), .skipped
    array, transform = to_model_space(study.scans[0].image, study.scans[0].modality, PreprocessSettings())
    heat = to_scan_space(model_map, transform)   # back onto the original scan's geometry
"""
from .preprocess import PreprocessSettings, model_image, to_model_space, to_scan_space
from .study import Discovery, StudySource, discover_studies, load_study
from .types import REASONS, IngestOptions, Scan, Skipped, Study

__all__ = ["Scan", "Study", "Skipped", "IngestOptions", "REASONS", "load_study", "discover_studies", "Discovery",
           "StudySource", "PreprocessSettings", "to_model_space", "to_scan_space", "model_image"]
