"""The plain-Python layer of SlicerHLIP: everything but the widgets and the MRML nodes.

It imports neither ``slicer``, ``qt`` nor ``vtk`` (and needs nothing outside the standard
library; numpy is used only to read heat-map voxels), so it runs inside 3D Slicer and under
pytest alike.
"""
from .client import (DownloadedScan, FindingRow, FindingsResult, HeatMap, HLIPClient, ScanListing, SearchHit, SearchResult,
                     ServerInfo, StudyListing, UploadedStudy, UploadFile, normalize_url)
from .errors import (AuthenticationFailed, AuthenticationRequired, BadAnswer, Cancelled, HLIPError, NotFound, NotHLIPServer,
                     PermissionDenied, RequestRejected, RequestTimeout, ServerBusy, ServerError, ServerUnreachable)
from .findings import (SERVER_DEFAULTS, TABLE_COLUMNS, Region, findings_preview, is_flagged, load_regions, model_row_of_table_row,
                       parse_findings_text, region_named, table_row_of_model_row, table_rows, table_sort_keys, with_server_defaults)
from .nifti import NiftiHeader, read_header, read_voxels, same_geometry, write_nifti
from .settings import JsonFileSettings, MemorySettings, RememberedSettings
from .study import Answer, LocalVolume, Question, ask, default_selection, plan_question
from .tasks import BackgroundTask, CancelToken, Progress

__all__ = [
    "Answer", "AuthenticationFailed", "AuthenticationRequired", "BackgroundTask", "BadAnswer", "CancelToken", "Cancelled",
    "DownloadedScan", "FindingRow", "FindingsResult", "HLIPClient", "HLIPError", "HeatMap", "JsonFileSettings",
    "LocalVolume", "MemorySettings", "NiftiHeader", "NotFound", "NotHLIPServer", "PermissionDenied", "Progress",
    "Question", "Region", "RememberedSettings", "RequestRejected", "RequestTimeout", "SERVER_DEFAULTS", "ScanListing",
    "SearchHit", "SearchResult", "ServerBusy", "ServerError", "ServerInfo", "ServerUnreachable", "StudyListing",
    "TABLE_COLUMNS", "UploadFile", "UploadedStudy", "ask", "default_selection", "findings_preview", "is_flagged",
    "load_regions", "model_row_of_table_row", "normalize_url", "parse_findings_text", "plan_question", "read_header",
    "read_voxels", "region_named", "same_geometry", "table_row_of_model_row", "table_rows", "table_sort_keys",
    "with_server_defaults", "write_nifti",
]
