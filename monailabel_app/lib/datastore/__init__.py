from .dicomweb import HLIPDicomWebDatastore
from .folder import StudyFolderDatastore

__all__ = ["HLIPDicomWebDatastore", "StudyFolderDatastore"]
