"""Ingestion: DICOM and NIfTI/NRRD/MHA studies to model-ready arrays, manifests and back.

    from hlip_core.data import load_study, PreprocessSettings, to_model_space, to_scan_space
    study = load_study("path/to/study")          # Study: .scans (SimpleITK images), .skipped
    array, transform = to_model_space(study.scans[0].image, study.scans[0].modality, PreprocessSettings())
    heat = to_scan_space(model_map, transform)   # back onto the original scan's geometry
    summary = prepare_archive("archive/", "prepared/", PreprocessSettings(target_shape=(48, 224, 224)),
                              reports="reports.csv", report_key="AccessionNumber", workers=8)
"""
from .archive import merge_shards, prepare_archive
from .dicom import NOT_DICOM, looks_like_dicom, require_dicom
from .preprocess import PreprocessSettings, model_image, to_model_space, to_scan_space
from .reports import read_reports, split_sentences
from .study import Discovery, StudySource, discover_studies, load_study
from .types import REASONS, IngestOptions, Scan, Skipped, Study

__all__ = ["Scan", "Study", "Skipped", "IngestOptions", "REASONS", "load_study", "discover_studies", "Discovery",
           "StudySource", "PreprocessSettings", "to_model_space", "to_scan_space", "model_image", "prepare_archive",
           "merge_shards", "read_reports", "split_sentences", "looks_like_dicom", "require_dicom", "NOT_DICOM"]
