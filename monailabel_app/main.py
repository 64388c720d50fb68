"""MONAI Label app serving an HLIP checkpoint: study-level findings from free text, heat maps,
text-to-study search and study similarity over the datastore.

    monailabel start_server --app monailabel_app --studies <folder | http://host:port/dicom-web> \
        --conf checkpoint <folder> --uvicorn_app monailabel_app.asgi:app --host 127.0.0.1 --port 8000

The HTTP routes beyond MONAI Label's own (a non-blocking /infer, /hlip/...) are installed by
``monailabel_app/asgi.py``; this file only builds the parts from ``--conf``.
"""
import logging
import os
import sys
import tempfile
from typing import Dict

from lib.configs import HLIPConfig
from lib.datastore import HLIPDicomWebDatastore, StudyFolderDatastore
from lib.index import StudyIndexer, model_fingerprint
from lib.infers import HLIPFindings
from lib.service import HLIPService
from lib.sessions import StudySessions
from lib.uploads import clean_temporary
from lib.worker import InferenceWorker
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask

log = logging.getLogger(__name__)


class HLIPApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.hlip_config = HLIPConfig.from_conf(conf, studies)
        cache = self.hlip_config.cache_dir
        removed = clean_temporary(cache / "tmp")  # one temporary area: partial files of a killed server go now
        if removed:
            log.info("removed %d temporary file(s) left by an earlier run", removed)
        # uploads and conversions spool to temporary files: keep them inside the cache folder
        self._previous_tempdir, tempfile.tempdir = tempfile.tempdir, str(cache / "tmp")
        bin_dir = os.path.dirname(sys.executable)  # dcmqi's tools: found offline, never downloaded
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + bin_dir
        import torch

        self._previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.hlip_config.threads)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="HLIP",
                         description="Study-level findings, heat maps and search with an HLIP model", version="0.1.0")
        self.worker = InferenceWorker(self.hlip_config.max_queue, self.hlip_config.threads)
        task: HLIPFindings = self._infers["hlip_findings"]
        self.indexer = StudyIndexer(self._datastore, self.worker,
                                    lambda study: task.embed(study, self._datastore.study_files),
                                    cache / "index" / model_fingerprint(self.hlip_config.checkpoint, self.hlip_config.precision, self.hlip_config.volume_modality),
                                    rescan_seconds=self.hlip_config.rescan_seconds, enabled=self.hlip_config.index,
                                    approximate_from=self.hlip_config.approximate_from, nprobe=self.hlip_config.nprobe)
        self.hlip = HLIPService(self.hlip_config, self._datastore, task, self.worker, self.indexer, self._sessions)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()  # -> init_remote_datastore below
        return StudyFolderDatastore(self.studies, self.hlip_config.cache_dir)

    def _init_dicomweb_datastore(self) -> Datastore:
        self._download_dcmqi_tools()  # MONAI Label's DICOM SEG tools: found offline in the dcmqi package
        return HLIPDicomWebDatastore.from_settings(self.studies, self.hlip_config.cache_dir)

    def init_infers(self) -> Dict[str, InferTask]:
        return {"hlip_findings": HLIPFindings(self.hlip_config)}

    def init_strategies(self):
        return {}

    def _load_sessions(self, load=False):
        if not load:
            return None
        path = settings.MONAI_LABEL_SESSION_PATH.strip() or str(self.hlip_config.cache_dir / "sessions")
        sessions = StudySessions(path, settings.MONAI_LABEL_SESSION_EXPIRY, self.hlip_config.sessions_max_bytes)
        sessions.remove_expired()  # expired ones and those a killed server left half written
        return sessions

    def on_init_complete(self):
        super().on_init_complete()
        self.worker.start()
        self.indexer.start()

    def hlip_shutdown(self):
        import torch

        self.indexer.stop()
        self.worker.stop()
        tempfile.tempdir = self._previous_tempdir
        torch.set_num_threads(self._previous_threads)
