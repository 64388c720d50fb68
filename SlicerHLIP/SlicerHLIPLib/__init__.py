"""The plain-Python layer of SlicerHLIP: everything but the widgets and the MRML nodes.

It imports neither ``slicer``, ``qt`` nor ``vtk`` (and needs nothing outside the standard
library but SimpleITK, which Slicer's Python has, to read a heat map's grid), so it runs inside
3D Slicer and under pytest alike.
"""
from .client import (DownloadedScan, FindingRow, FindingsResult, HeatMap, HLIPClient, ScanListing, SearchHit, SearchResult,
                     ServerInfo, StudyListing, UploadedStudy, UploadFile, normalize_url)
from .errors import (AuthenticationFailed, AuthenticationRequired, BadAnswer, Cancelled, HLIPError, NotFound, NotHLIPServer,
                     PermissionDenied, RequestRejected, RequestTimeout, ServerBusy, ServerError, ServerUnreachable)
from .findings import (SERVER_DEFAULTS, TABLE_COLUMNS, Region, findings_preview, is_flagged, load_regions, model_row_of_table_row,
                       parse_findings_text, region_named, table_row_of_model_row, table_rows, table_sort_keys, with_server_defaults)
from .settings import JsonFileSettings, MemorySettings, RememberedSettings
from .study import Answer, LocalVolume, Question, ask, default_selection, plan_question
from .tasks import BackgroundTask, CancelToken, Progress
from .volumefile import VolumeFileError, VolumeHeader, read_header, same_geometry

__all__ = [
    "Answer", "AuthenticationFailed", "AuthenticationRequired", "BackgroundTask", "BadAnswer", "CancelToken", "Cancelled",
    "DownloadedScan", "FindingRow", "FindingsResult", "HLIPClient", "HLIPError", "HeatMap", "JsonFileSettings",
    "LocalVolume", "MemorySettings", "NotFound", "NotHLIPServer", "PermissionDenied", "Progress",
    "Question", "Region", "RememberedSettings", "RequestRejected", "RequestTimeout", "SERVER_DEFAULTS", "ScanListing",
    "SearchHit", "SearchResult", "ServerBusy", "ServerError", "ServerInfo", "ServerUnreachable", "StudyListing",
    "TABLE_COLUMNS", "UploadFile", "UploadedStudy", "ask", "default_selection", "findings_preview", "is_flagged",
    "load_regions", "model_row_of_table_row", "normalize_url", "parse_findings_text", "plan_question", "read_header",
    "region_named", "same_geometry", "table_row_of_model_row", "table_rows", "table_sort_keys",
    "VolumeFileError", "VolumeHeader", "with_server_defaults",
]
