"""SlicerHLIP's client layer against a real ``monailabel start_server`` process with the HLIP app
and a tiny checkpoint: connect, upload a 4-volume study, ask, read the table rows and heat maps
(each in the geometry of its scan), ask a datastore study by id, search, cancel; and every error a
user can meet: 4xx answers, a full queue, time-outs, a wrong address, a stopped server, and
MONAI Label's authentication switched on."""
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from server_helpers import IdentityProvider, make_checkpoint, monailabel_server, require_ingestion, stop_process, write_nifti_study
from slicer_helpers import write_study
from SlicerHLIPLib import (AuthenticationFailed, AuthenticationRequired, BackgroundTask, Cancelled, HLIPClient, LocalVolume,
                           NotFound, NotHLIPServer, PermissionDenied, RequestRejected, RequestTimeout, ServerBusy,
                           ServerUnreachable, ask, plan_question, read_header, same_geometry, table_rows)
from SlicerHLIPLib.study import Question

FINDINGS = ["mass effect", "midline shift", "hydrocephalus"]
MANY = [f"finding number {i}" for i in range(32)]
MAX_UPLOAD_MB = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_ingestion()
    tmp = tmp_path_factory.mktemp("slicer-server")
    studies = tmp / "studies"
    write_nifti_study(studies / "studyA", n_scans=2, seed=21)
    write_nifti_study(studies / "studyB", n_scans=3, seed=22)
    originals = write_study(tmp / "originals", n_scans=4, seed=5)
    upload = []
    for i, path in enumerate(originals):  # uncompressed, as the Slicer module writes a node
        upload.append(tmp / f"node{i}.nii")
        sitk.WriteImage(sitk.ReadImage(str(path)), str(upload[-1]))
    return {"tmp": tmp, "studies": studies, "checkpoint": make_checkpoint(tmp / "ckpt"), "originals": originals, "upload": upload}


def conf(setup):
    return {"cache_dir": setup["tmp"] / "cache", "threads": 1, "rescan_seconds": 1, "max_queue": 1, "max_upload_mb": MAX_UPLOAD_MB}


def wait_idle(client: HLIPClient, indexed: int = 2, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        if status["index"]["indexed"] >= indexed and not status["worker"]["busy"] and not status["worker"]["waiting"]:
            return
        assert time.monotonic() < deadline, f"the server did not become idle: {status}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(setup):
    with monailabel_server(str(setup["studies"]), setup["checkpoint"], setup["tmp"] / "run1", conf(setup)) as (base, proc):
        wait_idle(HLIPClient(base))
        yield {"url": base, "proc": proc}


@pytest.fixture
def client(server):
    c = HLIPClient(server["url"])
    c.connect()
    wait_idle(c)
    return c


def upload_volumes(setup) -> tuple:
    volumes = [LocalVolume(f"vtkMRMLScalarVolumeNode{i}", f"series {i} (node)", modality="MR") for i in range(4)]
    files = {v.key: str(p) for v, p in zip(volumes, setup["upload"])}
    return volumes, files


# -- what a user does ----------------------------------------------------------------------------------


def test_connect_shows_the_model_and_its_default_findings(server):
    info = HLIPClient(server["url"]).connect()
    assert info.model == "hlip_findings" and info.name == "HLIP" and info.url == server["url"]
    assert info.default_findings[:2] == ["intracranial hemorrhage", "acute infarct"] and len(info.default_findings) == 8
    assert info.heatmaps is True and info.max_findings == 32
    assert info.datastore["studies"] == 2


def test_an_uploaded_four_volume_study_gets_findings_and_heat_maps_in_each_scans_geometry(client, setup, tmp_path):
    volumes, files = upload_volumes(setup)
    question = plan_question(volumes)
    assert question.study_id is None and len(question.uploads) == 4
    reports = []
    answer = ask(client, FINDINGS, question, files, heatmaps=True, out_dir=tmp_path / "maps",
                 progress=lambda fraction, message="": reports.append((fraction, message)))
    result = answer.result
    assert answer.uploaded.session_id and result.study_id == answer.uploaded.session_id
    assert list(answer.uploaded.files) == ["scan00.nii", "scan01.nii", "scan02.nii", "scan03.nii"]
    assert [r.finding for r in result.rows] == FINDINGS and result.skipped == []
    assert all(0 <= r.probability <= 1 and -2 <= r.score <= 2 for r in result.rows)
    assert result.server_ms > 0 and result.seconds * 1000 > result.server_ms
    by_key = {v.key: v for v in volumes}
    for row in result.rows:
        key = answer.row_keys[row.index]
        assert key in by_key, (row, answer.row_keys)
        heatmap = result.heatmaps[row.index]
        assert Path(heatmap.path).parent == tmp_path / "maps" and heatmap.finding == row.finding
        scan = read_header(files[key])
        assert same_geometry(heatmap.header, scan), (heatmap.header.affine_ras, scan.affine_ras)
        original = nib.load(setup["originals"][int(key[-1])])  # and as nibabel sees the scan the node came from
        assert heatmap.header.size == original.shape and np.allclose(heatmap.header.affine_ras, original.affine, atol=1e-4)
        values = sitk.GetArrayFromImage(sitk.ReadImage(heatmap.path))
        assert values.dtype == np.float32 and np.isfinite(values).all() and 0 <= values.min() and 0 < values.max() <= 1.0001
    # every finding's row names the user's own volume
    rows = table_rows(result, answer.scan_names, threshold=0.0)
    assert {r["Scan"] for r in rows} <= {v.name for v in volumes} and all(r["Flag"] == "above threshold" for r in rows)
    # progress: the upload is measured, the server's work is an open-ended wait, then the answer is read to the end
    fractions = [f for f, _ in reports if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(0 < f < 0.4 for f in fractions) and any(f is None for f, _ in reports)
    assert not list((tmp_path / "maps").glob(".partial-*"))


def test_a_datastore_study_is_downloaded_and_asked_by_id(client, setup, tmp_path):
    import SimpleITK as sitk

    listing = {s.study_id: s for s in client.studies()}
    assert set(listing) == {"studyA", "studyB"} and all(s.embedded for s in listing.values())
    reports = []
    scans = client.download_study("studyB", tmp_path / "dl", progress=lambda f, m="": reports.append(f))
    assert [s.image_id for s in scans] == [sc.image_id for sc in listing["studyB"].scans] and len(scans) == 3
    for scan in scans:
        original = sitk.ReadImage(str(setup["studies"] / "studyB" / (scan.image_id.split("__")[1] + ".nii.gz")))
        downloaded = sitk.ReadImage(scan.path)
        assert downloaded.GetSize() == original.GetSize() and np.allclose(downloaded.GetOrigin(), original.GetOrigin())
    assert [f for f in reports if f is not None][-1] == 1.0
    images = tuple(s.image_id for s in scans)
    volumes = [LocalVolume(f"node{i}", s.description or s.image_id, server_study="studyB", server_image=s.image_id,
                           server_study_images=images) for i, s in enumerate(scans)]
    question = plan_question(volumes)
    assert question.study_id == "studyB" and question.uploads == []
    answer = ask(client, FINDINGS[:2], question, heatmaps=True, out_dir=tmp_path / "maps")
    assert answer.uploaded is None and answer.result.study_id == "studyB"
    paths = {v.key: s.path for v, s in zip(volumes, scans)}
    for row in answer.result.rows:
        key = answer.row_keys[row.index]
        assert same_geometry(answer.result.heatmaps[row.index].header, read_header(paths[key]))


def test_without_heat_maps_the_answer_is_json_only(client, setup, tmp_path):
    volumes, files = upload_volumes(setup)
    answer = ask(client, FINDINGS, Question(volumes), files, heatmaps=False, out_dir=tmp_path / "maps")
    assert [r.finding for r in answer.result.rows] == FINDINGS and answer.result.heatmaps == {}
    assert all(r.heatmap is None for r in answer.result.rows)
    assert not (tmp_path / "maps").exists() or not list((tmp_path / "maps").iterdir())


def test_search_lists_the_datastores_studies_best_first(client):
    found = client.search("mass effect with midline shift", k=5)
    assert found.query == "mass effect with midline shift" and found.indexed == 2 and found.pending == 0
    assert sorted(h.study_id for h in found.hits) == ["studyA", "studyB"]
    assert [h.score for h in found.hits] == sorted((h.score for h in found.hits), reverse=True)
    assert all(-1 <= h.score <= 1 and h.scans for h in found.hits)
    assert [h.study_id for h in client.search("mass effect", k=1).hits] in (["studyA"], ["studyB"])
    similar = client.similar("studyA", k=5)
    assert [h.study_id for h in similar.hits] == ["studyB"]


# -- cancelling ---------------------------------------------------------------------------------------------


def test_cancelling_while_the_server_computes_abandons_the_request_at_once(client, setup, tmp_path):
    volumes, files = upload_volumes(setup)
    computing = threading.Event()

    def progress(fraction, message=""):
        if fraction is None and "computing" in message:
            computing.set()

    out = tmp_path / "maps"
    task = BackgroundTask(lambda p, cancel: ask(client, MANY, plan_question(volumes), files, heatmaps=True, out_dir=out,
                                                progress=progress, cancel=cancel)).start()
    assert computing.wait(60)
    time.sleep(0.2)
    assert not task.done, "the request finished before it could be cancelled"
    start = time.perf_counter()
    task.cancel()
    assert task.wait(5) and time.perf_counter() - start < 1.0
    with pytest.raises(Cancelled):
        task.result()
    assert not out.exists() or not list(out.iterdir())  # no heat map, whole or partial
    assert client.connect().model == "hlip_findings"  # the server carries on


def test_cancelling_an_upload_stops_sending(client, tmp_path):
    big = tmp_path / "big.nii"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    task = BackgroundTask(lambda p, cancel: client.upload_study([big], progress=lambda f, m="": cancel.cancel() if f else None,
                                                                cancel=cancel)).start()
    assert task.wait(10)
    with pytest.raises(Cancelled):
        task.result()
    assert client.connect().model == "hlip_findings"


# -- what the server refuses, in words --------------------------------------------------------------------


def test_refusals_reach_the_user_as_the_servers_sentences(server, client, setup, tmp_path):
    with pytest.raises(NotFound, match="no study or image with this id") as e:
        client.findings(FINDINGS, study="no-such-study", heatmaps=False)
    assert e.value.status == 404 and "Traceback" not in str(e.value)
    with pytest.raises(RequestRejected, match="ids are plain names") as e:
        client.findings(FINDINGS, study="../secret", heatmaps=False)
    assert e.value.status == 400
    with pytest.raises(NotFound, match="no upload session with this id"):
        client.findings(FINDINGS, session_id="nope", heatmaps=False)
    with pytest.raises(RequestRejected, match="k must be between 1 and 100"):
        client.search("mass effect", k=0)
    with pytest.raises(RequestRejected, match="the search text is empty"):
        client.search("   ")
    with pytest.raises(NotFound, match="no image with this id"):
        client.download_image("missing", tmp_path / "dl")
    assert not (tmp_path / "dl").exists() or not list((tmp_path / "dl").iterdir())
    unconnected = HLIPClient(server["url"])  # knows no limit: the server says it
    with pytest.raises(RequestRejected, match="at most 32") as e:
        unconnected.findings(MANY + ["one more"], study="studyA", heatmaps=False)
    with pytest.raises(ValueError, match="at most 32"):  # a connected client says it before sending
        client.findings(MANY + ["one more"], study="studyA", heatmaps=False)
    # a file that only looks like a volume is refused by the upload
    fake = tmp_path / "notes.nii"
    fake.write_text("these are notes, not an image")
    with pytest.raises(RequestRejected, match="'notes.nii' is not a readable NIfTI") as e:
        client.upload_study([fake])
    assert e.value.status == 400
    # a real volume that is no usable scan (2 slices) is accepted, then refused by the findings
    import SimpleITK as sitk

    thin = tmp_path / "thin.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, 2, sitk.sitkInt16), str(thin))
    session = client.upload_study([thin])
    with pytest.raises(RequestRejected, match="no usable scan") as e:
        client.findings(FINDINGS, session_id=session.session_id, heatmaps=False)
    assert e.value.status == 422
    # larger than the server accepts: it refuses before the body is sent, and the client reads why
    big = tmp_path / "big.nii"
    big.write_bytes(b"\0" * ((MAX_UPLOAD_MB + 1) * 1024 * 1024))
    with pytest.raises(RequestRejected, match=r"larger than this server accepts \(4 MB") as e:
        client.upload_study([big])
    assert e.value.status == 413


def fill_the_queue(client: HLIPClient, start_request) -> list:
    """One request running and one waiting (max_queue 1): start one, wait until the worker is busy,
    start the second, wait until it waits. Returns the two BackgroundTasks."""
    first = start_request(0)
    deadline = time.monotonic() + 30
    while not client.status()["worker"]["busy"] and not first.done:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = start_request(1)
    while client.status()["worker"]["waiting"] < 1 and not (first.done or second.done):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return [first, second]


def test_a_full_queue_is_said_and_retried(client, setup, tmp_path):
    volumes, files = upload_volumes(setup)
    session = client.upload_study([files[v.key] for v in volumes])

    def heavy(i, heatmaps=True):
        return BackgroundTask(lambda p, c: client.findings(MANY, session_id=session.session_id, heatmaps=heatmaps,
                                                           out_dir=tmp_path / f"busy-{i}-{time.monotonic_ns()}", cancel=c,
                                                           busy_retries=30)).start()

    for attempt in range(5):
        running = fill_the_queue(client, heavy)
        try:
            client.findings(FINDINGS, session_id=session.session_id, heatmaps=False, busy_retries=0)
        except ServerBusy as busy:
            assert busy.status == 503 and busy.retry_after >= 1 and "queue is full" in str(busy)
            break
        finally:
            for t in running:
                assert t.wait(120)
                assert len(t.result().rows) == 32
    else:
        pytest.fail("five attempts to fill the queue all finished first")
    # the same again, with retries: the client waits as the server asks, and gets its answer
    for attempt in range(5):
        running = fill_the_queue(client, lambda i: heavy(i, heatmaps=False))
        messages = []
        retried = client.findings(FINDINGS, session_id=session.session_id, heatmaps=False, busy_retries=30,
                                  progress=lambda f, m="": messages.append(m))
        assert [r.finding for r in retried.rows] == FINDINGS
        for t in running:
            assert t.wait(120) and len(t.result().rows) == 32
        if any(m.startswith("The server is busy; trying again in") for m in messages):
            break
    else:
        pytest.fail("five attempts to meet a full queue with retries all found room at once")


def test_a_slow_answer_times_out_in_words(server, client, setup, tmp_path):
    volumes, files = upload_volumes(setup)
    session = client.upload_study([files[v.key] for v in volumes])
    impatient = HLIPClient(server["url"], infer_timeout=0.05)
    start = time.perf_counter()
    with pytest.raises(RequestTimeout, match="did not answer to compute the findings within 0.05 s"):
        impatient.findings(MANY, session_id=session.session_id, heatmaps=True, out_dir=tmp_path / "maps")
    assert time.perf_counter() - start < 2
    assert not (tmp_path / "maps").exists() or not list((tmp_path / "maps").iterdir())


def test_a_wrong_path_on_the_right_host_is_not_an_hlip_server(server):
    with pytest.raises(NotHLIPServer, match="not a MONAI Label server") as e:
        HLIPClient(server["url"] + "/wrong/place").connect()
    assert e.value.status == 404


# -- a stopped server, then the same server with authentication on --------------------------------------------


def test_a_stopped_server_then_the_login_of_monai_labels_authentication(server, setup, tmp_path):
    stop_process(server["proc"])  # the same cache folder, one server at a time
    with pytest.raises(ServerUnreachable, match="Server not reachable at .*; is it running\\?"):
        HLIPClient(server["url"]).connect()
    users = {"radiologist": ("secret", ["monailabel-user"]), "visitor": ("guest", [])}
    with IdentityProvider(users) as idp:
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm}
        with monailabel_server(str(setup["studies"]), setup["checkpoint"], setup["tmp"] / "run2", conf(setup), env=env) as (base, _):
            client = HLIPClient(base)
            with pytest.raises(AuthenticationRequired, match="asks for a user name and password") as e:
                client.connect()
            assert e.value.status == 401 and client.auth_enabled()
            with pytest.raises(AuthenticationFailed, match="refused this user name and password"):
                client.login("radiologist", "wrong")
            assert client.token is None
            assert client.login("radiologist", "secret") is True and client.token.startswith("Bearer ")
            assert client.connect().model == "hlip_findings"
            volumes, files = upload_volumes(setup)  # the token goes with the upload, the question and the download
            answer = ask(client, FINDINGS[:1], plan_question(volumes), files, heatmaps=True, out_dir=tmp_path / "maps")
            assert len(answer.result.heatmaps) == 1
            assert client.download_image(client.studies()[0].scans[0].image_id, tmp_path / "dl")
            expired = HLIPClient(base, token="Bearer " + idp.token("radiologist", ["monailabel-user"], lifetime=-60))
            with pytest.raises(AuthenticationRequired):
                expired.connect()
            visitor = HLIPClient(base)
            visitor.login("visitor", "guest")
            with pytest.raises(PermissionDenied, match="not allowed to search") as e:
                visitor.search("mass effect")
            assert e.value.status == 403
