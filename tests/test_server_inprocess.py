"""Every route of the HLIP MONAI Label app and every error it must answer, in process
(``fastapi.testclient.TestClient`` over ``monailabel.app.app``, as MONAI Label's own tests do).

The datastore is a studies folder: two NIfTI studies, one DICOM study of two series, and one study
whose only series is a DICOM structured report (nothing the model can use).
"""
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from server_helpers import (APP_DIR, assert_info_not_queued, make_checkpoint, parse_multipart, read_nifti_bytes,
                            require_ingestion, same_geometry, wait_until_indexed, write_dicom_series, write_nifti_study)

FINDINGS = ["intracranial hemorrhage", "mass effect"]
MAX_QUEUE = 2


def write_report_only_study(folder: Path) -> None:
    """A DICOM study whose one series is a text report (Modality SR, no pixels)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "report.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.SeriesDescription = generate_uid(), generate_uid(), "SR", "report"
    ds.save_as(str(folder / "report.dcm"), write_like_original=False)


class Audit:
    """Every file the process opens, creates, moves or deletes at the Python level while ``active``
    (audit events), as (absolute path, written?) pairs."""

    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    CHANGES = {"os.remove": (0, 1), "os.rmdir": (0, 1), "os.mkdir": (0, 2), "os.rename": (0, 2), "os.replace": (0, 2)}

    def __init__(self):
        self.active, self.events = False, []
        sys.addaudithook(self)

    @staticmethod
    def _absolute(path, dir_fd=None) -> str:
        path = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
        if not os.path.isabs(path) and isinstance(dir_fd, int):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        return os.path.abspath(path)

    def __call__(self, event, args):
        if not self.active:
            return
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            written = any(c in str(mode) for c in "wax+") if mode is not None else bool((flags or 0) & self.WRITE_FLAGS)
            self.events.append((self._absolute(args[0]), written))
        elif event in self.CHANGES:
            path_at, fd_at = self.CHANGES[event]
            if event in ("os.rename", "os.replace"):
                self.events.append((self._absolute(args[0], args[2]), True))
                self.events.append((self._absolute(args[1], args[3]), True))
            else:
                self.events.append((self._absolute(args[path_at], args[fd_at] if len(args) > fd_at else None), True))


AUDIT = Audit()


PROBE_FINDINGS = ["mass", "haemorrhage"]


def write_probe(checkpoint: Path, path: Path) -> Path:
    """A linear probe for ``checkpoint`` (random weights: the server's wiring is what is tested)."""
    from hlip_core.eval.probe import LinearProbe, checkpoint_fingerprint

    dim = int(json.loads((checkpoint / "config.json").read_text())["config"]["embed_dim"])
    rng = np.random.default_rng(0)
    probe = LinearProbe(list(PROBE_FINDINGS), rng.normal(size=(2, dim)) * 3, np.array([0.1, -0.2]), "findings",
                        checkpoint_fingerprint(checkpoint), {"infarct": "one class in training"}, {"held_out": {"macro_auc": 0.75}})
    return probe.save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_ingestion()
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    tmp = tmp_path_factory.mktemp("inprocess")
    checkpoint = make_checkpoint(tmp / "ckpt")
    studies = tmp / "studies"
    write_nifti_study(studies / "nifti1", seed=1)
    write_nifti_study(studies / "nifti2", seed=2)
    t1 = write_dicom_series(studies / "dicom1" / "t1", "1.2.826.0.1.7.1", "1.2.826.0.1.7.1.1", description="T1 axial")
    write_dicom_series(studies / "dicom1" / "t2", "1.2.826.0.1.7.1", "1.2.826.0.1.7.1.2", description="T2 axial", series_number=2, seed=3)
    write_report_only_study(studies / "reportonly")
    (tmp / "secret.nii.gz").write_bytes((studies / "nifti1" / "scan0.nii.gz").read_bytes())  # a file no id may reach
    cache = tmp / "cache"
    probe = write_probe(checkpoint, tmp / "ckpt.probe.json")
    saved = (settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES, settings.MONAI_LABEL_APP_CONF)
    settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = str(APP_DIR), str(studies)
    settings.MONAI_LABEL_APP_CONF = {"checkpoint": str(checkpoint), "cache_dir": str(cache), "max_upload_mb": "2",
                                     "max_queue": str(MAX_QUEUE), "rescan_seconds": "1", "threads": "1", "probe": str(probe)}
    import monailabel_app.asgi  # noqa: F401  (installs the HLIP routes on MONAI Label's app)
    from monailabel.app import app

    try:
        with TestClient(app) as client:
            from monailabel.interfaces.utils.app import app_instance

            service = app_instance().hlip
            wait_until_indexed(service, 3, timeout=60)
            yield {"client": client, "service": service, "studies": studies, "cache": cache, "tmp": tmp, "t1": t1,
                   "checkpoint": checkpoint, "probe": probe}
    finally:
        settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES, settings.MONAI_LABEL_APP_CONF = saved


def infer(client, study, params=None, as_json=False, **query):
    q = {"image": study, **query} if study else query
    if as_json:
        return client.post("/infer/hlip_findings", params=q, json=params or {})
    return client.post("/infer/hlip_findings", params=q, data={"params": json.dumps(params or {})})


# -- what the server answers ------------------------------------------------------------------------


def test_info_lists_the_findings_model(server):
    info = server["client"].get("/info/").json()
    model = info["models"]["hlip_findings"]
    assert model["type"] == "hlip_findings" and model["dimension"] == 3 and "study" in model["description"]
    assert model["labels"][:2] == ["intracranial hemorrhage", "acute infarct"]  # the default findings
    assert info["datastore"]["studies"] == 4


def test_findings_for_a_study_or_any_of_its_images(server):
    client = server["client"]
    by_study = infer(client, "dicom1", {"findings": FINDINGS})
    assert by_study.status_code == 200 and by_study.headers["content-type"] == "application/json"
    answer = by_study.json()
    assert answer["study_id"] == "dicom1" and answer["elapsed_ms"] >= answer["compute_ms"] > 0
    assert [f["finding"] for f in answer["findings"]] == FINDINGS
    for f in answer["findings"]:
        assert 0 <= f["probability"] <= 1 and -2 <= f["score"] <= 2
        assert f["image_id"] in ("1.2.826.0.1.7.1.1", "1.2.826.0.1.7.1.2") and f["scan_description"] in ("T1 axial", "T2 axial")
    by_image = infer(client, "1.2.826.0.1.7.1.2", {"findings": FINDINGS}, as_json=True)  # JSON body instead of the form
    assert by_image.status_code == 200
    assert [f["probability"] for f in by_image.json()["findings"]] == [f["probability"] for f in answer["findings"]]


def test_info_names_the_probes_findings(server):
    probe = server["client"].get("/info/").json()["models"]["hlip_findings"]["config"]["probe"]
    assert probe == {"findings": PROBE_FINDINGS, "skipped": {"infarct": "one class in training"}, "embedding": "findings",
                     "held_out_macro_auc": 0.75}


def test_the_findings_answer_carries_the_probes_probabilities_beside_zero_shot(server):
    from hlip_core.data import load_study
    from hlip_core.eval.probe import LinearProbe
    from hlip_core.inference import StudyPredictor

    client = server["client"]
    answers = {sid: infer(client, sid, {"findings": FINDINGS}).json() for sid in ("nifti1", "nifti2")}
    predictor, probe = StudyPredictor.load(server["checkpoint"]), LinearProbe.load(server["probe"])
    for sid, answer in answers.items():
        assert [f["finding"] for f in answer["findings"]] == FINDINGS  # zero-shot rows as asked
        assert answer["probe"]["kind"] == "linear probe" and answer["probe"]["embedding"] == "findings"
        assert [f["finding"] for f in answer["probe"]["findings"]] == PROBE_FINDINGS  # the probe's own findings
        files = sorted(str(f) for f in (server["studies"] / sid).iterdir())
        z = predictor.embed(predictor.prepare(load_study(files, volume_modality="auto")), embedding="findings")
        expected = probe.probabilities(z)[0]
        assert np.allclose([f["probability"] for f in answer["probe"]["findings"]], expected, atol=1e-4), (sid, expected)
    assert answers["nifti1"]["probe"] != answers["nifti2"]["probe"]
    again = infer(client, "nifti1", {"findings": FINDINGS}).json()  # from memory: the same probe part
    assert again["probe"] == answers["nifti1"]["probe"]


def test_default_findings_are_used_when_none_are_asked(server):
    answer = infer(server["client"], "nifti2").json()
    assert [f["finding"] for f in answer["findings"]] == server["service"].config.findings


def test_a_repeated_request_is_answered_from_memory(server):
    client = server["client"]
    first = infer(client, "nifti1", {"findings": FINDINGS}).json()
    worker, gate, answers = server["service"].worker, threading.Event(), []
    worker.submit(gate.wait)  # the model is busy until the gate opens: only an answer from memory can come back
    try:
        repeat = threading.Thread(target=lambda: answers.append(infer(client, "nifti1", {"findings": FINDINGS})))
        repeat.start()
        repeat.join(timeout=30)
        assert answers, "the repeated request waited for the model"
    finally:
        gate.set()
    assert answers[0].status_code == 200 and answers[0].json()["findings"] == first["findings"]


def test_heat_maps_come_as_nifti_parts_in_the_driving_scans_geometry(server, tmp_path):
    import SimpleITK as sitk

    r = infer(server["client"], "nifti1", {"findings": FINDINGS, "heatmaps": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    parts = parse_multipart(r.headers["content-type"], r.content)
    assert list(parts) == ["params", "heatmap_0", "heatmap_1"]
    result = json.loads(parts["params"][2])
    for j, finding in enumerate(result["findings"]):
        name = finding["heatmap"]
        assert name == f"heatmap_{j}" and parts[name][0] == f"{name}.nii.gz"
        heatmap = read_nifti_bytes(parts[name][2], tmp_path, f"{name}.nii.gz")
        assert heatmap.GetPixelID() == sitk.sitkFloat32  # stored as uint8 codes with the NIfTI scale, read back as floats
        scan = sitk.ReadImage(str(server["studies"] / "nifti1" / (finding["image_id"].split("__")[1] + ".nii.gz")))
        assert same_geometry(heatmap, scan)
        values = sitk.GetArrayFromImage(heatmap)
        assert np.isfinite(values).all() and values.max() > 0


def test_heat_maps_are_uint8_with_a_scale_and_read_back_within_the_quantisation(server, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk
    from monailabel_app.lib.worker import INTERACTIVE

    service = server["service"]
    r = infer(server["client"], "nifti1", {"findings": FINDINGS, "heatmaps": True})
    parts = parse_multipart(r.headers["content-type"], r.content)
    rows = json.loads(parts["params"][2])["findings"]
    assert sorted(parts) == sorted(["params"] + [row["heatmap"] for row in rows])  # one map per finding: the driving scan's
    study = service.resolve("nifti1")  # the same model's float maps, computed on the worker as the server does
    task = service.task
    floats = service.worker.submit(lambda: task.predictor.predict(task.prepare(study, service.files_of), FINDINGS, heatmaps=True),
                                   INTERACTIVE).result(timeout=60)
    for row in rows:
        data = parts[row["heatmap"]][2]
        assert data[:2] == b"\x1f\x8b"  # gzip
        path = tmp_path / f"{row['heatmap']}.nii.gz"
        path.write_bytes(data)
        stored = nib.load(str(path))
        assert stored.get_data_dtype() == np.uint8
        reference = sitk.GetArrayFromImage(floats.heatmaps[row["finding"]])
        step = (reference.max() - reference.min()) / 255
        assert stored.dataobj.slope == pytest.approx(step, rel=1e-5)  # nibabel moves scl_slope to the array proxy
        for values in (sitk.GetArrayFromImage(sitk.ReadImage(str(path))), np.asarray(stored.dataobj).transpose(2, 1, 0)):
            assert np.abs(values - reference).max() <= step / 2 * 1.001 + 1e-7  # ITK (3D Slicer) and nibabel alike


def test_a_dicom_volume_downloads_in_the_geometry_of_its_heat_map(server, tmp_path):
    client = server["client"]
    volume = client.get("/datastore/image", params={"image": "1.2.826.0.1.7.1.1"})
    assert volume.status_code == 200
    image = read_nifti_bytes(volume.content, tmp_path, "volume.nii.gz")
    assert image.GetSize()[2] == 12
    r = infer(client, "dicom1", {"findings": ["mass effect"], "heatmaps": True})
    parts = parse_multipart(r.headers["content-type"], r.content)
    finding = json.loads(parts["params"][2])["findings"][0]
    driving = client.get("/datastore/image", params={"image": finding["image_id"]})
    assert same_geometry(read_nifti_bytes(parts["heatmap_0"][2], tmp_path), read_nifti_bytes(driving.content, tmp_path, "d.nii.gz"))
    assert client.head("/datastore/image", params={"image": "1.2.826.0.1.7.1.1"}).status_code == 200


def test_an_uploaded_study_is_scored_by_session(server, tmp_path):
    client = server["client"]
    paths = write_nifti_study(tmp_path / "upload", seed=9)
    files = [("files", (p.name, p.read_bytes(), "application/gzip")) for p in paths]
    created = client.put("/session/", files=files)
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    assert client.get(f"/session/{session_id}").status_code == 200  # MONAI Label's own session route still works
    r = infer(client, None, {"findings": FINDINGS}, session_id=session_id)
    assert r.status_code == 200, r.text
    assert r.json()["study_id"] == session_id and len(r.json()["findings"]) == 2


def test_a_volume_sent_with_the_request_is_scored_without_a_session_even_with_sessions_off(server, tmp_path, monkeypatch):
    client, cache = server["client"], server["cache"]
    volume = write_nifti_study(tmp_path / "upload", seed=11)[0]
    sessions = lambda: sorted(p.name for p in (cache / "sessions").glob("*"))  # noqa: E731
    before = sessions()
    monkeypatch.setattr(server["service"], "sessions", None)  # MONAI_LABEL_SESSIONS=false
    r = client.post("/infer/hlip_findings", data={"params": json.dumps({"findings": FINDINGS})},
                    files={"file": (volume.name, volume.read_bytes(), "application/gzip")})
    assert r.status_code == 200, r.text
    assert r.json()["study_id"] == "uploaded-file" and len(r.json()["findings"]) == 2  # no id of a session that is gone
    assert sessions() == before and not list((cache / "tmp").iterdir())
    refused = client.put("/session/", files=[("files", (volume.name, volume.read_bytes(), "application/gzip"))])
    assert refused.status_code == 406 and "multipart field 'file'" in refused.json()["detail"]  # the way that still works, by name


def test_a_sessions_file_is_sent_under_the_sessions_name_not_the_uploaded_one(server, tmp_path):
    client = server["client"]
    volume = write_nifti_study(tmp_path / "upload", seed=12)[0]
    created = client.put("/session/", files=[("files", ("Doe_Jane_1970-01-01.nii.gz", volume.read_bytes(), "application/gzip"))])
    assert created.status_code == 200, created.text
    session_id = created.json()["session_id"]
    r = client.get(f"/session/{session_id}", params={"image": "true"})
    assert r.status_code == 200 and r.content == volume.read_bytes()
    disposition = r.headers["content-disposition"]
    assert f'{session_id}.nii.gz' in disposition and "Doe" not in disposition
    client.delete(f"/session/{session_id}")


def write_volume(path: Path, hounsfield: bool, seed: int = 0) -> Path:
    """A 20x40x48 volume: CT-like (air at -1000 HU, tissue around 40 HU) or MR-like (0..1000)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    if hounsfield:
        vol = np.full((20, 40, 48), -1000.0, np.float32)
        vol[4:16, 8:32, 8:40] = 40 + 20 * rng.standard_normal((12, 24, 32))
    else:
        vol = (rng.random((20, 40, 48)) * 1000).astype(np.float32)
    image = sitk.GetImageFromArray(vol)
    image.SetSpacing((0.8, 0.8, 2.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def upload(client, paths, scans=None):
    files = [("files", (p.name, p.read_bytes(), "application/gzip")) for p in paths]
    return client.put("/session/", files=files, data={"scans": json.dumps(scans)} if scans is not None else None)


def test_an_upload_names_the_modality_of_each_volume(server, tmp_path):
    client = server["client"]
    head_ct = write_volume(tmp_path / "head_ct.nii.gz", hounsfield=True, seed=1)
    t1 = write_volume(tmp_path / "t1.nii.gz", hounsfield=False, seed=2)
    unnamed_ct = write_volume(tmp_path / "unnamed.nii.gz", hounsfield=True, seed=3)  # an older client: no modality
    said_mr = write_volume(tmp_path / "said_mr.nii.gz", hounsfield=True, seed=4)  # the client's word wins over "auto"
    created = upload(client, [head_ct, t1, unnamed_ct, said_mr],
                     [{"file": "head_ct.nii.gz", "modality": "CT"}, {"file": "t1.nii.gz", "modality": "mr"},
                      {"file": "said_mr.nii.gz", "modality": "MR"}, {"file": "unnamed.nii.gz"}])
    assert created.status_code == 200, created.text
    assert created.json()["scans"] == [{"file": "head_ct.nii.gz", "modality": "CT"}, {"file": "t1.nii.gz", "modality": "MR"},
                                       {"file": "unnamed.nii.gz", "modality": "auto"}, {"file": "said_mr.nii.gz", "modality": "MR"}]
    r = infer(client, None, {"findings": FINDINGS}, session_id=created.json()["session_id"])
    assert r.status_code == 200, r.text
    used = {s["image_id"]: s["modality"] for s in r.json()["scans"]}
    assert used == {"head_ct.nii.gz": "CT", "t1.nii.gz": "MR", "unnamed.nii.gz": "CT", "said_mr.nii.gz": "MR"}
    for row in r.json()["findings"]:
        assert row["scan_modality"] == used[row["image_id"]]


def test_the_modality_changes_what_the_model_reads(server, tmp_path):
    client = server["client"]
    volume = write_volume(tmp_path / "scan.nii.gz", hounsfield=True, seed=5)
    answers = {}
    for modality in ("CT", "MR"):
        session = upload(client, [volume], [{"file": "scan.nii.gz", "modality": modality}]).json()["session_id"]
        answer = infer(client, None, {"findings": FINDINGS}, session_id=session).json()
        assert [row["scan_modality"] for row in answer["findings"]] == [modality] * len(FINDINGS)
        answers[modality] = [row["score"] for row in answer["findings"]]
    assert answers["CT"] != answers["MR"]  # a Hounsfield window and a percentile clip give the model different voxels


def test_an_upload_without_a_usable_volume_is_answered_with_the_reason(server, tmp_path):
    import SimpleITK as sitk

    path = tmp_path / "two_slices.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((2, 16, 16), np.float32)), str(path))  # readable, but no volume
    created = upload(server["client"], [path])
    assert created.status_code == 200, created.text
    r = infer(server["client"], None, {"findings": FINDINGS}, session_id=created.json()["session_id"])
    assert r.status_code == 422 and "no usable scan" in r.json()["detail"] and "too few slices" in r.json()["detail"]


def test_status_reports_the_queue_the_cache_and_the_datastore(server):
    status = server["client"].get("/hlip/status").json()
    assert status["worker"]["max_queue"] == MAX_QUEUE and status["worker"]["done"] > 0
    assert status["index"]["indexed"] >= 3 and status["index"]["failed"] >= 1  # reportonly cannot be embedded
    assert status["datastore"]["scanned"] is True and status["datastore"]["studies"] >= 4
    assert "cache_dir" not in status and str(server["cache"]) not in json.dumps(status)  # no absolute path in an answer


def test_search_similar_and_the_list_of_studies(server):
    client = server["client"]
    studies = {s["study_id"]: s for s in client.get("/hlip/studies").json()["studies"]}
    assert set(studies) == {"nifti1", "nifti2", "dicom1", "reportonly"}
    assert [sc["image_id"] for sc in studies["dicom1"]["scans"]] == ["1.2.826.0.1.7.1.1", "1.2.826.0.1.7.1.2"]
    assert studies["dicom1"]["scans"][0]["description"] == "T1 axial"
    assert all(studies[s]["embedded"] for s in ("nifti1", "nifti2", "dicom1"))
    assert studies["reportonly"]["embedded"] is False and studies["reportonly"]["error"]

    found = client.get("/hlip/search", params={"text": "mass effect", "k": 10}).json()
    assert found["query"] == "mass effect" and found["indexed"] == 3 and found["pending"] == 0
    assert sorted(r["study_id"] for r in found["results"]) == ["dicom1", "nifti1", "nifti2"]
    assert all(-1 <= r["score"] <= 1 and r["scans"] for r in found["results"])
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)

    similar = client.get("/hlip/similar", params={"study": "1.2.826.0.1.7.1.2", "k": 5}).json()  # an image id finds its study
    assert similar["query"] == "dicom1" and sorted(r["study_id"] for r in similar["results"]) == ["nifti1", "nifti2"]


def test_search_reads_a_faiss_index_from_approximate_from_studies_with_the_exact_answer(server):
    client, indexer = server["client"], server["service"].indexer
    exact = client.get("/hlip/search", params={"text": "mass effect", "k": 10}).json()["results"]
    similar = client.get("/hlip/similar", params={"study": "nifti1", "k": 5}).json()["results"]
    saved = indexer.approximate_from
    try:
        indexer.approximate_from = 3  # as --conf approximate_from 3 would (the conf's floor is 256 studies)
        indexer._save()
        assert indexer._index.ann is not None and (indexer.folder / "faiss.index").is_file()
        assert client.get("/hlip/search", params={"text": "mass effect", "k": 10}).json()["results"] == exact
        assert client.get("/hlip/similar", params={"study": "nifti1", "k": 5}).json()["results"] == similar
    finally:
        indexer.approximate_from = saved
        indexer._save()
    assert indexer._index.ann is None and not (indexer.folder / "faiss.index").exists()


def test_a_full_queue_answers_503_with_retry_after(server):
    client, worker = server["client"], server["service"].worker
    gate = threading.Event()
    blocker = worker.submit(gate.wait)
    while not worker.status()["busy"]:
        time.sleep(0.01)
    answers = []
    waiting = [threading.Thread(target=lambda i=i: answers.append(infer(client, "nifti2", {"findings": [f"queued finding {i}"]})))
               for i in range(MAX_QUEUE)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 10
    while worker.status()["waiting"] < MAX_QUEUE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    start = time.perf_counter()
    refused = infer(client, "nifti2", {"findings": ["one too many"]})
    assert time.perf_counter() - start < 5.0  # refused at once: a queued request would wait for the gate, opened below
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "queue is full" in refused.json()["detail"]
    gate.set()
    for t in waiting:
        t.join(30)
    assert blocker.result(5) is True and [a.status_code for a in answers] == [200] * MAX_QUEUE


def test_info_does_not_wait_for_the_model_to_finish(server):
    client, worker = server["client"], server["service"].worker
    many = [f"finding number {i}" for i in range(32)]
    busy_latencies = []
    for attempt in range(6):
        request = threading.Thread(target=infer, args=(client, f"nifti{1 + attempt % 2}", {"findings": many, "heatmaps": True}))
        request.start()
        while request.is_alive():
            start = time.perf_counter()
            assert client.get("/info/").status_code == 200
            latency = time.perf_counter() - start
            if worker.status()["busy"]:
                busy_latencies.append(latency)
            time.sleep(0.01)
        if len(busy_latencies) >= 20:
            break
    assert len(busy_latencies) >= 20, f"only {len(busy_latencies)} /info/ calls overlapped an inference"
    assert_info_not_queued(busy_latencies)


# -- what the server refuses ------------------------------------------------------------------------


def _form(params: str) -> dict:
    return {"data": {"params": params}}


ERRORS = [
    ("post", "/infer/nope?image=nifti1", {}, 404, "no such model"),
    ("post", "/infer/hlip_findings?image=missing", {}, 404, "no study or image with this id"),
    ("post", "/infer/hlip_findings?image=../secret", {}, 400, "ids are plain names"),
    ("post", "/infer/hlip_findings?image=nifti1/scan0.nii.gz", {}, 400, "ids are plain names"),
    ("post", "/infer/hlip_findings?image=..", {}, 400, "contains '..'"),
    ("post", "/infer/hlip_findings?session_id=../../etc", {}, 400, "ids are plain names"),
    ("post", "/infer/hlip_findings?session_id=nope", {}, 404, "no upload session with this id"),
    ("post", "/infer/hlip_findings", {}, 400, "give exactly one of image="),
    ("post", "/infer/hlip_findings?image=nifti1&session_id=x", {}, 400, "give exactly one of image="),
    ("post", "/infer/hlip_findings?image=nifti1", _form('{"findings": ["mass effect", "  "]}'), 400, "finding 1 is empty"),
    ("post", "/infer/hlip_findings?image=nifti1", _form(json.dumps({"findings": ["x" * 301]})), 400, "the limit is 300"),
    ("post", "/infer/hlip_findings?image=nifti1", _form(json.dumps({"findings": ["f"] * 33})), 400, "at most 32"),
    ("post", "/infer/hlip_findings?image=nifti1", _form('{"findings": []}'), 400, "no findings given"),
    ("post", "/infer/hlip_findings?image=nifti1", _form('{"findings": 7}'), 400, "must be a list of strings"),
    ("post", "/infer/hlip_findings?image=nifti1", _form('{"findings": ["a"], "heatmaps": "yes"}'), 400, "heatmaps must be true or false"),
    ("post", "/infer/hlip_findings?image=nifti1", _form("{not json"), 400, "params is not valid JSON"),
    ("post", "/infer/hlip_findings?image=nifti1", _form("[1, 2]"), 400, "params must be a JSON object"),
    ("post", "/infer/hlip_findings?image=nifti1&output=image", {}, 400, "output='image' is not offered"),
    ("post", "/infer/hlip_findings?image=nifti1", {"files": {"file": ("a.nii.gz", b"x")}}, 400, "uploaded file 'a.nii.gz' is not a readable NIfTI"),
    ("post", "/infer/hlip_findings?image=nifti1", {"content": b"findings", "headers": {"content-type": "text/plain"}}, 415, "not as text/plain"),
    ("post", "/infer/hlip_findings?image=reportonly", _form('{"findings": ["a"]}'), 422, "no usable scan"),
    ("get", "/hlip/search?text=", {}, 400, "the search text is empty"),
    ("get", "/hlip/search?text=" + "w" * 301, {}, 400, "the limit is 300"),
    ("get", "/hlip/search?text=mass&k=0", {}, 400, "k must be between 1 and 100"),
    ("get", "/hlip/search?text=mass&k=many", {}, 422, "k:"),
    ("get", "/hlip/search", {}, 422, "text: Field required"),
    ("get", "/hlip/similar?study=missing", {}, 404, "no study or image with this id"),
    ("get", "/hlip/similar?study=../secret", {}, 400, "ids are plain names"),
    ("get", "/hlip/similar?study=reportonly", {}, 422, "has no embedding"),
    ("get", "/datastore/image?image=../secret.nii.gz", {}, 400, "ids are plain names"),
    ("get", "/datastore/image?image=%2E%2E%2Fsecret", {}, 400, "ids are plain names"),
    ("get", "/datastore/image?image=missing", {}, 404, "no image with this id"),
    ("get", "/session/%2E%2E", {}, 400, "contains '..'"),
    ("put", "/session/", {"json": {"files": []}}, 400, "multipart/form-data"),
    ("put", "/session/", {"files": {"other": ("a.nii.gz", b"x")}}, 400, "no files in the upload"),
    ("put", "/session/", {"files": {"files": ("notes.txt", b"hello")}}, 400, "'notes.txt' is neither DICOM nor a NIfTI"),
    ("put", "/session/", {"files": {"files": ("scan0.nii.gz", b"\x1f\x8b truncated")}}, 400, "'scan0.nii.gz' is not a readable NIfTI"),
    ("put", "/session/", {"files": {"files": ("scan0.nii", b"\0" * 400)}}, 400, "'scan0.nii' is not a readable NIfTI"),
    ("put", "/session/", {"files": {"files": ("a.nii.gz", b"x")}, "data": {"scans": "[{"}}, 400, "the 'scans' field is not valid JSON"),
    ("put", "/session/", {"files": {"files": ("a.nii.gz", b"x")}, "data": {"scans": '{"file": "a.nii.gz"}'}}, 400,
     "'scans' field must be a JSON list of objects with a 'file' name"),
    ("put", "/session/", {"files": {"files": ("a.nii.gz", b"x")}, "data": {"scans": '[{"file": "b.nii.gz", "modality": "CT"}]'}}, 400,
     "names 'b.nii.gz', which is not a file of this upload"),
    ("put", "/session/", {"files": {"files": ("a.nii.gz", b"x")}, "data": {"scans": '[{"file": "a.nii.gz", "modality": "brain"}]'}}, 400,
     "the modality of 'a.nii.gz' must be \"auto\" or a DICOM modality code"),
    ("put", "/session/", {"files": {"files": ("a.nii.gz", b"x")}, "data": {"scans": '[{"file": "a.nii.gz", "kind": "CT"}]'}}, 400,
     "unknown key(s) kind"),
    ("put", "/session/", {"files": [("files", ("a.nii.gz", b"x")), ("files", ("a.nii.gz", b"y"))],
                          "data": {"scans": '[{"file": "a.nii.gz", "modality": "CT"}]'}}, 400, "uploaded more than once"),
    ("put", "/session/?uncompress=true", {"files": {"files": ("a.zip", b"x")}, "data": {"scans": '[{"file": "a.zip"}]'}}, 400,
     "cannot name the files inside an archive"),
    ("put", "/session/?uncompress=true", {"files": {"files": ("a.zip", b"not a zip")}}, 400, "uncompress=true needs one .zip"),
    ("put", "/session/", {"files": {"files": ("big.nii.gz", b"\0" * (3 * 1024 * 1024))}}, 413, "max_upload_mb"),
    ("put", "/datastore/image?image=new", {"files": {"file": ("new.nii.gz", b"x")}}, 405, "read-only"),
    ("delete", "/datastore/?id=nifti1", {}, 405, "read-only"),
    ("post", "/train/hlip_findings", {}, 404, "this server does not train models"),
    ("post", "/train/", {}, 404, "this server does not train models"),
    ("post", "/batch/infer/hlip_findings", {}, 400, "hlip_findings runs per study"),
    ("get", "/proxy/dicom/wado/studies", {}, 404, "not a DICOMweb server"),
]


@pytest.mark.parametrize("method, url, kwargs, status, words", ERRORS, ids=[f"{e[0]} {e[1][:60]} -> {e[3]}" for e in ERRORS])
def test_errors_are_json_answers_in_words(server, method, url, kwargs, status, words):
    r = getattr(server["client"], method)(url, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail and "Traceback" not in detail


def test_attacks_touch_no_file_outside_the_datastore_and_the_cache(server, tmp_path):
    client, studies, cache, tmp = server["client"], server["studies"], server["cache"], server["tmp"]
    before = {p: p.stat().st_mtime_ns for p in studies.rglob("*")}
    AUDIT.events.clear()
    AUDIT.active = True
    try:
        for method, url, kwargs, _, _ in ERRORS:
            getattr(client, method)(url, **kwargs)
        infer(client, "nifti2", {"findings": ["a finding never asked before"], "heatmaps": True})
        paths = write_nifti_study(tmp_path / "up", n_scans=1, seed=4)
        client.put("/session/", files=[("files", (paths[0].name, paths[0].read_bytes(), "application/gzip"))])
    finally:
        AUDIT.active = False
    roots = [str(studies), str(cache), sys.prefix, sys.base_prefix, str(Path(__file__).parent.parent), "/proc", "/sys", "/dev", str(tmp_path)]
    outside = [(p, w) for p, w in AUDIT.events if not p.startswith(tuple(roots))]
    assert not outside, f"files outside the datastore and the cache: {outside[:10]}"
    assert not [p for p, _ in AUDIT.events if "secret" in p], "a crafted id reached a file outside the datastore"
    written = [p for p, w in AUDIT.events if w and not p.startswith((str(cache), str(tmp_path))) and "__pycache__" not in p]
    assert not written, f"written outside the cache: {written[:10]}"
    assert len([p for p, w in AUDIT.events if w and p.startswith(str(cache))]) > 3  # the audit did see the server's own writes
    assert {p: p.stat().st_mtime_ns for p in studies.rglob("*")} == before, "the studies folder was modified"


def test_the_cache_fills_in_the_background_without_holding_requests(server):
    """Four study folders copied in while the server runs; each embedding waits for a permit, so
    the test decides when the background work moves. A search (text tower only) is answered while
    the first new study is held mid-embedding; a findings request that arrives then is answered as
    soon as that one study is done, before the next starts: it waits for the study in progress,
    never for the queue. Then the new studies are embedded and searchable."""
    import shutil

    client, service, studies = server["client"], server["service"], server["studies"]
    indexer = service.indexer
    embed = indexer.embed_fn
    permits = threading.Semaphore(0)

    def held_embed(study):
        # The timeout turns a request stuck behind the queue into a failed assertion below, not a hang.
        permits.acquire(timeout=20)
        return embed(study)

    indexer.embed_fn = held_embed
    added = [f"added{i}" for i in range(4)]
    answers: list = []
    try:
        infer(client, "nifti1", {"findings": ["mass effect"]})  # the study is loaded and prepared
        # The copy must not race the rescan (every second here): a scan that sees two of the four
        # folders starts embedding them and only lists the rest after the held queue is done. So the
        # background embedding is paused while the folders are moved in whole, until the catalog
        # lists all four, and only then let go.
        indexer.enabled = False
        staging = server["tmp"] / "staging"
        for i, name in enumerate(added):
            write_nifti_study(staging / name, n_scans=1, seed=30 + i)
            (staging / name).rename(studies / name)
        deadline = time.monotonic() + 10
        while indexer.counts()["pending"] < len(added):
            assert time.monotonic() < deadline, f"the new studies were not listed: {indexer.counts()}"
            time.sleep(0.05)
        indexer.enabled = True
        indexer.poke()
        deadline = time.monotonic() + 10
        while indexer.counts()["embedding"] is None:
            assert time.monotonic() < deadline, "the new studies were not picked up"
            time.sleep(0.02)
        found = client.get("/hlip/search", params={"text": "a search made while the cache fills"})
        assert found.status_code == 200 and indexer.counts()["pending"] == len(added), "the search waited for the background work"
        request = threading.Thread(target=lambda: answers.append(infer(client, "nifti1", {"findings": ["a finding asked while the cache fills"]})))
        request.start()
        deadline = time.monotonic() + 10
        while service.worker.status()["waiting"] < 1:
            assert time.monotonic() < deadline, f"the findings request never reached the model: {service.worker.status()}"
            time.sleep(0.02)
        permits.release()  # the study in progress may finish; the next one is held
        request.join(timeout=60)
        pending = indexer.counts()["pending"]
        permits.release(len(added))
        assert answers and answers[0].status_code == 200, "the findings request was not answered"
        assert pending == len(added) - 1, (
            f"the findings request waited for the background queue ({pending} of {len(added)} new studies pending when answered)")
        deadline = time.monotonic() + 30
        while indexer.counts()["pending"]:
            assert time.monotonic() < deadline, f"the new studies were not embedded: {service.status()}"
            time.sleep(0.1)
        listed = {s["study_id"]: s for s in client.get("/hlip/studies").json()["studies"]}
        assert all(listed[name]["embedded"] for name in added)
        found = client.get("/hlip/search", params={"text": "mass effect", "k": 20}).json()
        assert set(added) <= {r["study_id"] for r in found["results"]}
    finally:
        permits.release(len(added))
        indexer.embed_fn = embed
        indexer.enabled = True
        for name in added:
            shutil.rmtree(studies / name, ignore_errors=True)
        indexer.poke()


# -- issue 20: hostile or clumsy clients -------------------------------------------------------------


def test_other_web_pages_get_no_cors_permission_by_default(server):
    client = server["client"]
    evil = {"Origin": "http://evil.example"}
    answer = client.get("/datastore/image", params={"image": "nifti1"}, headers=evil)
    assert "access-control-allow-origin" not in answer.headers and "access-control-allow-credentials" not in answer.headers
    preflight = client.options("/datastore/image", headers={**evil, "Access-Control-Request-Method": "PUT",
                                                              "Access-Control-Request-Headers": "authorization"})
    assert "access-control-allow-origin" not in preflight.headers and "access-control-allow-methods" not in preflight.headers


def test_cors_origins_must_be_named_origins():
    from monailabel_app.lib.routes import cors_origins

    assert cors_origins({}) == [] and cors_origins({"cors_origins": "http://a.example, https://b.example:8443/"}) == \
        ["http://a.example", "https://b.example:8443"]
    for bad in ("*", "evil.example"):
        with pytest.raises(ValueError, match="cors_origins"):
            cors_origins({"cors_origins": bad})


def test_a_named_origin_gets_cors_permission_and_no_other(monkeypatch):
    # MONAI Label's own middleware (every origin, with credentials) replaced by --conf cors_origins
    from fastapi import FastAPI
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    from monailabel_app.lib.routes import _same_origin_cors

    app = FastAPI()
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_credentials=True, allow_methods=["*"], allow_headers=["*"])
    app.get("/info/")(lambda: {"ok": True})
    monkeypatch.setattr(settings, "MONAI_LABEL_APP_CONF", {"cors_origins": "http://viewer.example"})
    _same_origin_cors(app)
    client = TestClient(app)
    allowed = client.get("/info/", headers={"Origin": "http://viewer.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://viewer.example"  # named, never '*'
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in client.get("/info/", headers={"Origin": "http://evil.example"}).headers
    preflight = client.options("/info/", headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "DELETE"})
    assert preflight.status_code == 400 and "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("method,url", [("post", "/scoring/anything"), ("get", "/scoring/"), ("delete", "/scoring/"),
                                        ("post", "/activelearning/random")])
def test_routes_that_do_not_apply_answer_404_without_a_child_process(server, method, url):
    import psutil

    before = len(psutil.Process().children(recursive=True))
    answer = getattr(server["client"], method)(url)
    assert answer.status_code == 404 and "does not apply" in answer.json()["detail"]
    assert len(psutil.Process().children(recursive=True)) == before


def test_labels_cannot_be_saved_and_logs_are_refused_without_auth(server):
    client = server["client"]
    label = client.put("/datastore/label", params={"image": "nifti1"}, files={"label": ("l.nii.gz", b"x")})
    assert label.status_code == 405 and "label" in label.json()["detail"]
    logs = client.get("/logs/")
    assert logs.status_code == 403 and "admin" in logs.json()["detail"]


def test_no_answer_carries_an_absolute_path_or_echoes_an_unknown_id(server, tmp_path):
    client = server["client"]
    volume = (server["studies"] / "nifti1" / "scan0.nii.gz").read_bytes()
    created = client.put("/session/", files=[("files", ("scan0.nii.gz", volume))])
    assert created.status_code == 200
    session_id = created.json()["session_id"]
    got = client.get(f"/session/{session_id}")
    assert got.status_code == 200 and got.json()["name"] == session_id
    for answer in (created, got, client.get("/hlip/status")):
        assert str(server["tmp"]) not in answer.text and '"/' not in answer.text, answer.text
    assert client.delete(f"/session/{session_id}").status_code == 200
    assert client.get(f"/session/{session_id}").status_code == 404
    assert client.delete(f"/session/{session_id}").status_code == 404
    for unsafe in ("a..b", "a%5Cb", "x" * 300):  # the session routes check ids as every other route does
        assert client.get(f"/session/{unsafe}").status_code == 400
        assert client.delete(f"/session/{unsafe}").status_code == 400
    for url, params in [("/datastore/image/info", {"image": "nosuch4711"}), ("/datastore/image", {"image": "nosuch4711"}),
                        ("/infer/hlip_findings", {"image": "nosuch4711"}), ("/infer/hlip_findings", {"session_id": "nosuch4711"})]:
        answer = client.post(url, params=params, data={"params": "{}"}) if url.startswith("/infer") else client.get(url, params=params)
        assert answer.status_code == 404 and "nosuch4711" not in answer.text, (url, answer.text)
    image = client.get("/hlip/studies").json()["studies"][0]["scans"][0]["image_id"]
    assert client.get("/datastore/image/info", params={"image": image}).status_code == 200


def test_deep_long_or_untyped_bodies_are_refused_in_words(server):
    client = server["client"]
    deep = client.post("/infer/hlip_findings", params={"image": "nifti1"}, content="[" * 100_000 + "]" * 100_000,
                       headers={"Content-Type": "application/json"})
    assert deep.status_code == 400 and "deeper" in deep.json()["detail"]
    long = client.post("/infer/hlip_findings", params={"image": "nifti1"}, data={"params": json.dumps({"findings": ["x" * (1 << 20)]})})
    assert long.status_code in (400, 413)
    untyped = client.post("/infer/hlip_findings", params={"image": "nifti1"}, content=b'{"findings": ["mass effect"]}',
                          headers={"Content-Type": ""})
    assert untyped.status_code == 415 and "Content-Type" in untyped.json()["detail"]


def test_a_token_without_exp_is_refused(monkeypatch):
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa
    from monailabel.config import settings
    from monailabel.endpoints.user import auth

    from monailabel_app.lib.routes import _fix_token_check

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    monkeypatch.setattr(settings, "MONAI_LABEL_AUTH_ENABLE", True)
    monkeypatch.setattr(auth, "get_public_key", lambda realm: key.public_key())
    monkeypatch.setattr(auth, "from_token", auth.from_token)  # restored afterwards
    _fix_token_check()
    forever = jwt.encode({"preferred_username": "u"}, key, algorithm="RS256")
    with pytest.raises(jwt.MissingRequiredClaimError):
        auth.from_token(forever)
    timed = jwt.encode({"preferred_username": "u", "exp": int(time.time()) + 60}, key, algorithm="RS256")
    assert auth.from_token(timed).username == "u"
