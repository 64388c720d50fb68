"""The server's parts on their own (issue 6): settings, the inference worker's queue, ids, the
studies-folder datastore, the embedding cache and the request guards. None of these needs the
model or the study ingestion."""
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server_helpers import parse_multipart, write_dicom_series, write_nifti_study

from monailabel_app.lib.configs import DEFAULT_FINDINGS, HLIPConfig
from monailabel_app.lib.datastore.catalog import unsafe_id_reason
from monailabel_app.lib.datastore.folder import StudyFolderDatastore
from monailabel_app.lib.index import StudyIndexer
from monailabel_app.lib.worker import BACKGROUND, INTERACTIVE, InferenceWorker, QueueFull


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# -- settings ---------------------------------------------------------------------------------------


def test_settings_come_from_conf_strings(tmp_path):
    (tmp_path / "ckpt").mkdir()
    cfg = HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt"), "findings": " mass effect; midline shift ;;",
                                "heatmaps": "false", "max_upload_mb": "3", "cache_dir": str(tmp_path / "c")}, "studies")
    assert cfg.findings == ["mass effect", "midline shift"]
    assert cfg.heatmaps is False and cfg.max_upload_bytes == 3 * 1024 * 1024 and cfg.cache_dir == tmp_path / "c"
    default = HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt")}, "studies")
    assert default.findings == DEFAULT_FINDINGS and default.volume_modality == "auto" and default.device == "cpu"
    assert (default.approximate_from, default.nprobe) == (2_000_000, 16)  # exact search below 2M studies
    approx = HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt"), "approximate_from": "300000", "nprobe": "32"}, "studies")
    assert (approx.approximate_from, approx.nprobe) == (300_000, 32)
    assert HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt"), "volume_modality": "ct", "device": "cuda:1"},
                                "studies").volume_modality == "CT"


@pytest.mark.parametrize("conf, words", [
    ({}, "--conf checkpoint <folder> is required"),
    ({"checkpoint": "/nonexistent/ckpt"}, "no such checkpoint folder"),
    ({"checkpoint": "CKPT", "heatmap": "true"}, "unknown --conf key(s) heatmap"),
    ({"checkpoint": "CKPT", "heatmaps": "maybe"}, "heatmaps must be true or false"),
    ({"checkpoint": "CKPT", "max_queue": "0"}, "max_queue must be between 1"),
    ({"checkpoint": "CKPT", "precision": "fp8"}, "precision must be fp32 or bf16"),
    ({"checkpoint": "CKPT", "device": "gpu"}, "device must be cpu, cuda, cuda:<n> or mps"),
    ({"checkpoint": "CKPT", "rescan_seconds": "soon"}, "rescan_seconds must be a number"),
    ({"checkpoint": "CKPT", "volume_modality": "MRI"}, "volume_modality must be \"auto\" or a DICOM modality code"),
    ({"checkpoint": "CKPT", "findings": "mass effect;" + "x" * 301}, "--conf findings: finding 1 is 301 characters long"),
    ({"checkpoint": "CKPT", "max_findings": "2"}, "--conf findings lists 8 findings; --conf max_findings is 2"),
    ({"checkpoint": "CKPT", "approximate_from": "10"}, "--conf approximate_from must be between 256"),
    ({"checkpoint": "CKPT", "nprobe": "many"}, "--conf nprobe must be a whole number"),
])
def test_bad_settings_are_named(tmp_path, conf, words):
    (tmp_path / "ckpt").mkdir()
    conf = {k: (str(tmp_path / "ckpt") if v == "CKPT" else v) for k, v in conf.items()}
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        HLIPConfig.from_conf(conf, "studies")


# -- the worker -------------------------------------------------------------------------------------


@pytest.fixture
def worker():
    w = InferenceWorker(max_queue=2).start()
    yield w
    w.stop()


def test_interactive_jobs_run_before_background_ones(worker):
    gate, order = threading.Event(), []
    worker.submit(gate.wait)
    background = worker.submit(lambda: order.append("background"), BACKGROUND)
    interactive = worker.submit(lambda: order.append("interactive"), INTERACTIVE)
    gate.set()
    background.result(5), interactive.result(5)
    assert order == ["interactive", "background"]


def test_a_full_queue_refuses_at_once_with_a_retry_time(worker):
    gate = threading.Event()
    running = worker.submit(gate.wait)
    while not worker.status()["busy"]:
        time.sleep(0.01)
    waiting = [worker.submit(lambda: 1), worker.submit(lambda: 2)]
    start = time.perf_counter()
    with pytest.raises(QueueFull) as e:
        worker.submit(lambda: 3)
    # refused at once: a submission that waited for room would wait for the gate, opened below
    assert time.perf_counter() - start < 2.0 and e.value.retry_after >= 1 and "queue is full" in str(e.value)
    worker.submit(lambda: "background", BACKGROUND)  # the embedding cache is not refused
    gate.set()
    assert [f.result(5) for f in waiting] == [1, 2] and running.result(5) is True
    assert worker.submit(lambda: 4).result(5) == 4  # room again


def test_a_failing_job_fails_its_future_only(worker):
    def boom():
        raise ValueError("no usable scan")

    with pytest.raises(ValueError, match="no usable scan"):
        worker.submit(boom).result(5)
    assert worker.submit(lambda: "still alive").result(5) == "still alive"


def test_stopping_fails_what_is_still_queued():
    w = InferenceWorker(max_queue=4).start()
    gate = threading.Event()
    w.submit(gate.wait)
    left = w.submit(lambda: "never")
    threading.Timer(0.2, gate.set).start()
    w.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        left.result(5)


# -- ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["../etc", "a/b", "..", "a..b", "x\\y", "", ".hidden", "a\x00b", "x" * 300])
def test_ids_that_could_name_other_files_are_refused(value):
    assert unsafe_id_reason(value)


@pytest.mark.parametrize("value", ["study001", "1.2.840.113619.2.55.3", "patient_7__flair", "CT head 2024-01-02"])
def test_ordinary_ids_pass(value):
    assert unsafe_id_reason(value) is None


# -- the studies folder -----------------------------------------------------------------------------


@pytest.fixture
def studies(tmp_path):
    root = tmp_path / "studies"
    t1 = write_dicom_series(root / "studyA" / "dicom" / "s1", "1.2.3.4", "1.2.3.4.1", n_slices=4, description="T1")
    t2 = write_dicom_series(root / "studyA" / "dicom" / "s2", "1.2.3.4", "1.2.3.4.2", n_slices=4, description="T2", series_number=2)
    (root / "studyA" / "notes.txt").write_text("not an image")
    write_nifti_study(root / "studyB", n_scans=2, shape=(4, 8, 8))
    write_nifti_study(root / "flat", n_scans=1, shape=(4, 8, 8))
    (root / "flat" / "scan0.nii.gz").rename(root / "single.nii.gz")
    (root / "flat").rmdir()
    write_nifti_study(root / ".hidden", n_scans=1, shape=(4, 8, 8))
    write_nifti_study(root / "bad..name", n_scans=1, shape=(4, 8, 8))
    return root, t1 + t2


def test_each_sub_folder_is_a_study_and_each_series_or_volume_an_image(studies, tmp_path):
    root, dicom = studies
    store = StudyFolderDatastore(str(root), tmp_path / "cache")
    assert store.refresh() is True
    found = {sid: [(s.image_id, s.description) for s in st.scans] for sid, st in store.catalog.studies().items()}
    assert found == {
        "studyA": [("1.2.3.4.1", "T1"), ("1.2.3.4.2", "T2")],
        "studyB": [("studyB__scan0", "scan0"), ("studyB__scan1", "scan1")],
        "single": [("single", "single")],
    }
    assert store.catalog.get("1.2.3.4.2").study_id == "studyA"  # any image id leads to its whole study
    assert sorted(store.study_files(store.catalog.get("studyA"))) == sorted(str(p) for p in dicom)
    assert store.get_image_uri("studyB__scan1") == str(root / "studyB" / "scan1.nii.gz")
    assert store.get_image_info("1.2.3.4.1")["study_id"] == "studyA"
    assert store.status()["studies"] == 3 and store.status()["total"] == 5
    assert store.refresh() is False  # nothing changed


def test_unsafe_or_unknown_ids_never_become_paths(studies, tmp_path):
    root, _ = studies
    store = StudyFolderDatastore(str(root), tmp_path / "cache")
    store.refresh()
    for bad in ["../studies/studyB/scan0", "studyB/scan0.nii.gz", "..", "nope"]:
        assert store.get_image_uri(bad) == "" and store.get_image_info(bad) == {}
        assert store.refresh_one(bad) is None


def test_the_studies_folder_is_never_written_and_headers_are_cached(studies, tmp_path, monkeypatch):
    root, _ = studies
    before = tree(root)
    store = StudyFolderDatastore(str(root), tmp_path / "cache")
    store.refresh()
    assert tree(root) == before
    assert (tmp_path / "cache" / "catalog" / "dicom_headers.json").is_file()

    import pydicom

    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: (_ for _ in ()).throw(AssertionError("header read again")))
    again = StudyFolderDatastore(str(root), tmp_path / "cache")  # a restart: unchanged files are not read again
    again.refresh()
    assert [s.image_id for s in again.catalog.get("studyA").scans] == ["1.2.3.4.1", "1.2.3.4.2"]


def test_changes_and_new_folders_are_seen(studies, tmp_path):
    root, dicom = studies
    store = StudyFolderDatastore(str(root), tmp_path / "cache")
    store.refresh()
    before = {k: v.signature for k, v in store.catalog.studies().items()}
    os.utime(dicom[0], ns=(1, 1))
    write_nifti_study(root / "studyC", n_scans=1, shape=(4, 8, 8))
    assert store.refresh_one("studyC").study_id == "studyC"  # a request for a folder just copied in
    assert store.refresh() is True
    after = {k: v.signature for k, v in store.catalog.studies().items()}
    assert after["studyA"] != before["studyA"] and after["studyB"] == before["studyB"] and "studyC" in after


# -- the embedding cache ----------------------------------------------------------------------------


class FakeEmbedder:
    """Deterministic vectors; counts calls; refuses the studies named in ``unusable``."""

    def __init__(self, unusable=()):
        self.calls, self.unusable = [], set(unusable)

    def __call__(self, study):
        self.calls.append(study.study_id)
        if study.study_id in self.unusable:
            raise ValueError(f"study {study.study_id} has no usable scan (1 slice)")
        v = np.random.default_rng(abs(hash((study.study_id, study.signature))) % 2**32).standard_normal(16)
        return v / np.linalg.norm(v)


@pytest.fixture
def folder_store(tmp_path):
    root = tmp_path / "studies"
    for i in range(4):
        write_nifti_study(root / f"s{i}", n_scans=1, shape=(4, 8, 8), seed=i)
    return root, StudyFolderDatastore(str(root), tmp_path / "cache")


def test_the_cache_fills_persists_and_survives_a_restart(folder_store, tmp_path, worker):
    root, store = folder_store
    embed = FakeEmbedder(unusable={"s3"})
    index = StudyIndexer(store, worker, embed, tmp_path / "cache" / "index" / "m1")
    store.refresh()
    index._fill()
    assert sorted(embed.calls) == ["s0", "s1", "s2", "s3"]
    assert index.counts() == {"indexed": 3, "pending": 0, "failed": 1, "embedding": None}
    manifest = json.loads((tmp_path / "cache" / "index" / "m1" / "embedded.json").read_text())
    assert manifest["studies"]["s0"]["detail"] == {"scan0.nii.gz": (root / "s0" / "scan0.nii.gz").stat().st_mtime_ns}
    assert "no usable scan" in manifest["failed"]["s3"]["reason"]
    hits = index.search(index.vector("s1")[None], 2)[0]
    assert hits[0][0] == "s1" and hits[0][1] > 0.999

    embed2 = FakeEmbedder()
    restarted = StudyIndexer(StudyFolderDatastore(str(root), tmp_path / "cache"), worker, embed2, tmp_path / "cache" / "index" / "m1")
    restarted.datastore.refresh()
    restarted._fill()
    assert embed2.calls == [] and restarted.counts()["indexed"] == 3 and restarted.counts()["failed"] == 1
    np.testing.assert_allclose(restarted.vector("s2"), index.vector("s2"), atol=2e-3)  # stored as float16


def test_from_approximate_from_studies_the_cache_keeps_a_faiss_index_and_rebuilds_a_corrupt_one(folder_store, tmp_path, worker, caplog):
    root, store = folder_store
    folder = tmp_path / "cache" / "index" / "m1"
    index = StudyIndexer(store, worker, FakeEmbedder(), folder, approximate_from=4, nprobe=2)
    store.refresh()
    index._fill()
    assert index._index.ann is not None and index._index.ann.ntotal == 4
    side = json.loads((folder / "faiss.json").read_text())
    assert (side["count"], side["embedding"], side["nprobe"]) == (4, "reports", 2)
    hits = index.search(index.vector("s2")[None], 2)[0]
    assert hits[0][0] == "s2" and hits[0][1] > 0.999

    (folder / "faiss.index").write_bytes(b"\0" * 64)  # a damaged file: the cache is kept, the FAISS index rebuilt
    restarted = StudyIndexer(StudyFolderDatastore(str(root), tmp_path / "cache"), worker, FakeEmbedder(), folder, approximate_from=4)
    assert "approximate index not used" in caplog.text and "not a readable FAISS index" in caplog.text
    assert restarted.counts()["indexed"] == 4 and restarted._index.ann is not None
    assert restarted.search(index.vector("s2")[None], 2)[0] == hits
    below = StudyIndexer(StudyFolderDatastore(str(root), tmp_path / "cache"), worker, FakeEmbedder(), folder, approximate_from=5)
    assert below._index.ann is None  # fewer studies than approximate_from: exact search
    below._save()
    assert not (folder / "faiss.index").exists() and not (folder / "faiss.json").exists()


def test_changed_studies_are_embedded_again_and_removed_ones_dropped(folder_store, tmp_path, worker):
    root, store = folder_store
    embed = FakeEmbedder(unusable={"s3"})
    index = StudyIndexer(store, worker, embed, tmp_path / "cache" / "index" / "m1")
    store.refresh()
    index._fill()
    embed.calls.clear()
    embed.unusable.clear()
    os.utime(root / "s0" / "scan0.nii.gz", ns=(5, 5))
    import shutil

    shutil.rmtree(root / "s1")
    (root / "s3" / "scan0.nii.gz").write_bytes((root / "s2" / "scan0.nii.gz").read_bytes())  # fixed: tried again
    store.refresh()
    assert index.counts()["pending"] == 2
    index._fill()
    assert sorted(embed.calls) == ["s0", "s3"]
    assert sorted(json.loads((tmp_path / "cache" / "index" / "m1" / "ids.json").read_text())) == ["s0", "s2", "s3"]
    assert index.counts() == {"indexed": 3, "pending": 0, "failed": 0, "embedding": None}


def test_the_background_loop_fills_the_cache_and_stops(folder_store, tmp_path, worker):
    _, store = folder_store
    embed = FakeEmbedder()
    index = StudyIndexer(store, worker, embed, tmp_path / "cache" / "index" / "m1", rescan_seconds=60).start()
    deadline = time.monotonic() + 10
    while index.counts()["indexed"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    index.stop()
    assert index.counts()["indexed"] == 4 and not index._thread.is_alive()


# -- guards and answers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from monailabel_app.lib.routes import GuardMiddleware

    app = FastAPI()

    @app.api_route("/echo", methods=["GET", "PUT"])
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    app.add_middleware(GuardMiddleware, upload_limit=lambda: 1000)
    return TestClient(app)


@pytest.mark.parametrize("query", ["image=../../etc/passwd", "session_id=..", "study=a/b", "label=x%5Cy", "image=%2E%2E"])
def test_unsafe_ids_in_queries_are_refused_before_any_route(guarded, query):
    r = guarded.get(f"/echo?{query}")
    assert r.status_code == 400 and "ids are plain names" in r.json()["detail"]


def test_free_text_may_hold_slashes(guarded):
    assert guarded.get("/echo", params={"text": "T2/FLAIR hyperintensity"}).status_code == 200


def test_bodies_over_the_limit_are_refused(guarded):
    assert guarded.put("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    r = guarded.put("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b"y" * 400

    r = guarded.put("/echo", content=chunks())
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"]


def test_the_multipart_answer_reads_with_the_standard_library():
    from monailabel_app.lib.service import multipart

    body, content_type = multipart({"study_id": "s", "findings": [{"heatmap": "heatmap_0"}]}, [("heatmap_0", b"\x1f\x8b\x00\xff\r\n--")])
    parts = parse_multipart(content_type, body)
    assert list(parts) == ["params", "heatmap_0"]
    assert json.loads(parts["params"][2]) == {"study_id": "s", "findings": [{"heatmap": "heatmap_0"}]}
    assert parts["params"][1] == "application/json"
    assert parts["heatmap_0"][0] == "heatmap_0.nii.gz" and parts["heatmap_0"][2] == b"\x1f\x8b\x00\xff\r\n--"


def test_a_server_can_switch_heat_maps_off_and_bounds_the_findings(tmp_path):
    from fastapi import HTTPException

    from monailabel_app.lib.service import HLIPService

    (tmp_path / "ckpt").mkdir()
    cfg = HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt"), "heatmaps": "false", "max_findings": "2", "findings": "a;b"}, "studies")
    service = HLIPService(cfg, None, None, None, None, None)
    assert service.want_heatmaps({}) is False
    with pytest.raises(HTTPException) as e:
        service.want_heatmaps({"heatmaps": True})
    assert e.value.status_code == 400 and "switched off" in e.value.detail
    assert service.findings_names({"findings": ["  mass   effect "]}) == ["mass effect"]
    assert service.findings_names({"findings": "a;b"}) == ["a", "b"]
    with pytest.raises(HTTPException) as e:
        service.findings_names({"findings": ["a", "b", "c"]})
    assert "at most 2" in e.value.detail


def test_search_says_when_the_embedding_cache_is_switched_off(tmp_path):
    from types import SimpleNamespace

    from fastapi import HTTPException

    from monailabel_app.lib.service import HLIPService

    (tmp_path / "ckpt").mkdir()
    cfg = HLIPConfig.from_conf({"checkpoint": str(tmp_path / "ckpt"), "index": "false"}, "studies")
    service = HLIPService(cfg, None, None, None, SimpleNamespace(enabled=cfg.index), None)
    for ask in (lambda: service.search("mass effect", 5), lambda: service.similar("study1", 5)):
        with pytest.raises(HTTPException) as e:
            ask()
        assert e.value.status_code == 409 and "--conf index false" in e.value.detail


# -- the DICOMweb datastore's series cache ----------------------------------------------------------


def test_a_series_first_seen_half_received_is_downloaded_again_when_the_pacs_has_more(tmp_path, monkeypatch):
    """A PACS receives a series instance by instance. The catalog's instance count (QIDO's
    NumberOfSeriesRelatedInstances) says when the files kept are no longer the whole series."""
    import monailabel_app.lib.datastore.dicomweb as dicomweb
    from monailabel_app.lib.datastore.catalog import ScanEntry, StudyEntry

    pacs = {"n": 4}
    downloads = []

    def download(study_uid, series_uid, folder, client, by_frame):  # stands in for WADO-RS
        downloads.append(pacs["n"])
        os.makedirs(folder, exist_ok=True)
        for i in range(pacs["n"]):
            Path(folder, f"{i:04d}.dcm").write_bytes(b"instance %d" % i)

    class Images:
        def image_path(self):
            return str(tmp_path / "series")

    monkeypatch.setattr(dicomweb, "dicom_web_download_series", download)
    store = object.__new__(dicomweb.HLIPDicomWebDatastore)  # no client: only the series cache is under test
    store._datastore, store._client, store._fetch_by_frame = Images(), None, False
    store._download_lock = threading.Lock()
    scan = ScanEntry("1.2.9.1", "DWI", "MR", [], series_uid="1.2.9.1")

    def study(count):
        return StudyEntry("1.2.9", [scan], f"sig-{count}", {"1.2.9.1": count})

    assert len(store.study_files(study("4"))) == 4
    assert len(store.study_files(study("4"))) == 4 and downloads == [4]  # kept, not downloaded again
    pacs["n"] = 10
    files = store.study_files(study("10"))
    assert len(files) == 10 and downloads == [4, 10]
    assert len(store.study_files(study(""))) == 10 and downloads == [4, 10]  # no count from the PACS: the files kept
    assert not [p for p in (tmp_path / "series").iterdir() if p.name.startswith(".")]  # no download left half-written


def test_the_zipped_multipart_answer_holds_every_map_in_one_file():
    import io
    import zipfile

    from monailabel_app.lib.service import multipart

    maps = [("heatmap_0", b"first"), ("heatmap_1", b"second")]
    body, content_type = multipart({"findings": [{"heatmap": "heatmap_0"}, {"heatmap": "heatmap_1"}]}, maps, zipped=True)
    parts = parse_multipart(content_type, body)
    assert list(parts) == ["params", "heatmaps.zip"] and parts["heatmaps.zip"][0] == "heatmaps.zip"
    assert json.loads(parts["params"][2])["heatmap_file"] == "heatmaps.zip"
    with zipfile.ZipFile(io.BytesIO(parts["heatmaps.zip"][2])) as z:
        assert {n: z.read(n) for n in z.namelist()} == {"heatmap_0.nii.gz": b"first", "heatmap_1.nii.gz": b"second"}


def test_a_heat_map_is_quantised_to_uint8_and_refused_when_not_finite(tmp_path):
    import SimpleITK as sitk

    from monailabel_app.lib.infers.hlip_findings import quantised_nifti

    values = np.random.default_rng(3).random((6, 7, 8)).astype(np.float32) * 0.4 + 0.1
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.5, 1.5, 3.0))
    image.SetOrigin((1.0, -2.0, 7.5))
    for source, expected in ((values, values), (np.full_like(values, 0.25), np.full_like(values, 0.25))):
        one = sitk.GetImageFromArray(source)
        one.CopyInformation(image)
        (tmp_path / "m.nii.gz").write_bytes(quantised_nifti(one, tmp_path))
        back = sitk.ReadImage(str(tmp_path / "m.nii.gz"))
        step = max(float(source.max() - source.min()) / 255, 1e-7)
        assert np.abs(sitk.GetArrayFromImage(back) - expected).max() <= step / 2 * 1.001
        assert back.GetSpacing() == image.GetSpacing() and back.GetOrigin() == image.GetOrigin()
    assert sorted(os.listdir(tmp_path)) == ["m.nii.gz"]  # SimpleITK's file is gone
    values[2, 3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        quantised_nifti(sitk.GetImageFromArray(values), tmp_path)


@pytest.mark.parametrize("params, words", [({"heatmap_format": "tar"}, "heatmap_format must be one of parts, zip"),
                                           ({"heatmap_scans": "some"}, "heatmap_scans must be one of driving, all")])
def test_unknown_heat_map_options_are_refused_by_name(params, words):
    from fastapi import HTTPException

    from monailabel_app.lib.service import HLIPService

    service = HLIPService(None, None, None, None, None, None)
    assert service.heatmap_options({}) == ("parts", False) and service.heatmap_options({"client_id": None}) == ("zip", False)
    with pytest.raises(HTTPException, match=words):
        service.heatmap_options(params)
