"""SlicerHLIP's plain-Python layer on its own: multipart in both directions, a volume file's grid
(read with SimpleITK, checked against nibabel), remembered settings, findings
text, which volumes are checked and how a study is asked, background tasks, and the errors a
user sees when the address is wrong (answers a real HLIP server never gives: those come from
loopback stand-ins here; the real server's errors are in test_slicer_server.py)."""
import email
import email.policy
import io
import json
import threading
import time

import numpy as np
import pytest

from slicer_helpers import silent_server, static_server, unused_port_url, write_study
from SlicerHLIPLib import (TABLE_COLUMNS, BackgroundTask, Cancelled, HLIPClient, JsonFileSettings, LocalVolume, MemorySettings,
                           NotHLIPServer, RememberedSettings, RequestTimeout, ServerUnreachable, default_selection, findings_preview,
                           is_flagged, load_regions, model_row_of_table_row, normalize_url, parse_findings_text, plan_question,
                           read_header, region_named, same_geometry, table_row_of_model_row, table_rows, table_sort_keys,
                           with_server_defaults)
from SlicerHLIPLib.client import FindingRow, FindingsResult
from SlicerHLIPLib.multipart import FieldPart, FilePart, MultipartBody, MultipartError, boundary_of, read_multipart
from SlicerHLIPLib.errors import BadAnswer
from SlicerHLIPLib.tasks import CancelToken
from SlicerHLIPLib.volumefile import VolumeFileError

# -- multipart ---------------------------------------------------------------------------------------


def parse_all(body: bytes, content_type: str, chunk: int) -> list:
    """[(name, filename, content type, bytes)] in body order."""
    parts = []

    def open_part(headers):
        parts.append((headers, io.BytesIO()))
        return parts[-1][1]

    stream = io.BytesIO(body)
    n = read_multipart(stream.read, boundary_of(content_type), open_part, lambda h, s: None, chunk_size=chunk)
    assert n == len(parts)
    return [(h.name, h.filename, h.content_type, sink.getvalue()) for h, sink in parts]


@pytest.mark.parametrize("chunk", [1, 3, 17, 4096, 1 << 20])
def test_the_servers_multipart_answer_is_parsed_whatever_the_read_size(chunk):
    from requests_toolbelt import MultipartEncoder  # what the HLIP server encodes its answers with

    rng = np.random.default_rng(chunk)
    heat = rng.bytes(50_000) + b"\r\n--" + rng.bytes(100)  # data that looks like the start of a delimiter
    result = json.dumps({"findings": [{"finding": "mass effect", "heatmap": "heatmap_0"}]})
    encoder = MultipartEncoder(fields=[("result", (None, result, "application/json")),
                                       ("heatmap_0", ("heatmap_0.nii.gz", heat, "application/octet-stream")),
                                       ("empty", ("empty.bin", b"", "application/octet-stream"))])
    assert parse_all(encoder.to_string(), encoder.content_type, chunk) == [
        ("result", None, "application/json", result.encode()),
        ("heatmap_0", "heatmap_0.nii.gz", "application/octet-stream", heat),
        ("empty", "empty.bin", "application/octet-stream", b"")]


def test_an_upload_body_is_what_a_standard_parser_reads(tmp_path):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii"
    a.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    b.write_bytes(b"\r\n--not-the-boundary\r\n" * 10)
    body = MultipartBody([FilePart("files", str(a), "scan00.nii.gz"), FilePart("files", str(b), "scan01.nii"),
                          FieldPart("scans", '[{"file": "scan00.nii.gz", "modality": "CT"}]', "application/json")])
    data = b"".join(body.chunks(chunk_size=100))
    assert len(data) == len(body)
    message = email.message_from_bytes(f"Content-Type: {body.content_type}\r\n\r\n".encode() + data, policy=email.policy.HTTP)
    parts = list(message.iter_parts())
    assert [p.get_filename() for p in parts] == ["scan00.nii.gz", "scan01.nii", None]
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["files", "files", "scans"]
    assert parts[0].get_payload(decode=True) == a.read_bytes() and parts[1].get_payload(decode=True) == b.read_bytes()
    assert json.loads(parts[2].get_payload(decode=True)) == [{"file": "scan00.nii.gz", "modality": "CT"}]
    assert parse_all(data, body.content_type, 7) == [(p.get_param("name", header="content-disposition"), p.get_filename(),
                                                      p.get_content_type(), p.get_payload(decode=True)) for p in parts]


def test_a_truncated_or_foreign_answer_is_refused():
    from requests_toolbelt import MultipartEncoder

    encoder = MultipartEncoder(fields=[("result", (None, "{}", "application/json")), ("heatmap_0", ("h.nii.gz", b"x" * 1000, "a/b"))])
    body = encoder.to_string()
    with pytest.raises(MultipartError, match="ends"):
        parse_all(body[:-300], encoder.content_type, 64)
    with pytest.raises(MultipartError, match="no multipart delimiter"):
        parse_all(b"<html>proxy error</html>", encoder.content_type, 64)
    with pytest.raises(MultipartError, match="not a multipart"):
        boundary_of("application/json")
    with pytest.raises(ValueError, match="line break"):
        MultipartBody([FieldPart("a\r\nb", "x")])


# -- NIfTI ---------------------------------------------------------------------------------------------


def test_a_volume_files_grid_is_read_as_nibabel_reads_it(tmp_path):
    import nibabel as nib

    paths = write_study(tmp_path / "study", n_scans=4)
    rng = np.random.default_rng(0)
    affine = np.array([[0, -1.2, 0, 40.0], [0.9, 0, 0, -20.0], [0, 0, 2.5, 7.0], [0, 0, 0, 1]])
    two = tmp_path / "other.nii.gz"  # another writer than the study's, a non-diagonal affine
    nib.save(nib.Nifti1Image(rng.random((6, 7, 5)).astype(np.float32), affine), two)
    for path in paths + [two]:
        header, loaded = read_header(path), nib.load(path)
        assert header.size == loaded.shape
        assert np.allclose(header.affine_ras, loaded.affine, atol=1e-4)
        assert np.allclose(header.spacing, loaded.header.get_zooms(), atol=1e-5)
    headers = [read_header(p) for p in paths]
    assert same_geometry(headers[0], read_header(paths[0])) and not same_geometry(headers[0], headers[2])
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8bnot gzip at all")
    with pytest.raises(VolumeFileError, match="not a volume file"):
        read_header(bad)
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), flat)
    with pytest.raises(VolumeFileError, match="2D image"):
        read_header(flat)


@pytest.mark.parametrize("part", ["params", "result"])
def test_the_json_part_of_a_findings_answer_is_params_or_result(tmp_path, part):
    from requests_toolbelt import MultipartEncoder

    import SimpleITK as sitk

    map_file = tmp_path / "map.nii.gz"
    sitk.WriteImage(sitk.Image(4, 5, 6, sitk.sitkFloat32), str(map_file))
    answer = json.dumps({"study_id": "s", "findings": [{"finding": "mass effect", "probability": 0.7, "heatmap": "heatmap_0"}]})
    encoder = MultipartEncoder(fields=[(part, (None, answer, "application/json")),
                                       ("heatmap_0", ("heatmap_0.nii.gz", map_file.read_bytes(), "application/octet-stream"))])
    body = encoder.to_string()

    class Response:  # what http.client gives the client: headers and a read(n)
        headers = {"Content-Type": encoder.content_type, "Content-Length": str(len(body))}
        read = io.BytesIO(body).read

    result = HLIPClient("http://127.0.0.1:1")._read_findings(Response(), tmp_path / "out", lambda f, m="": None, CancelToken())
    assert [r.finding for r in result.rows] == ["mass effect"] and result.heatmaps[0].header.size == (4, 5, 6)
    missing = MultipartEncoder(fields=[("answer", (None, answer, "application/json"))])
    body = missing.to_string()
    Response.headers = {"Content-Type": missing.content_type, "Content-Length": str(len(body))}
    Response.read = io.BytesIO(body).read
    with pytest.raises(BadAnswer, match="no 'params'"):
        HLIPClient("http://127.0.0.1:1")._read_findings(Response(), tmp_path / "out2", lambda f, m="": None, CancelToken())


# -- settings, findings, choices ------------------------------------------------------------------------


def test_settings_are_remembered_in_any_store(tmp_path):
    store = JsonFileSettings(tmp_path / "settings.json")
    settings = RememberedSettings(store)
    assert settings.server_url == "http://127.0.0.1:8000" and settings.findings_text == ""
    settings.server_url = "http://a:1"
    settings.server_url = "http://b:2"
    settings.server_url = "http://a:1"
    settings.findings_text = "midline shift\nmass effect"
    settings.heatmap_opacity = 0.7
    again = RememberedSettings(JsonFileSettings(tmp_path / "settings.json"))
    assert again.server_url == "http://a:1" and again.recent_server_urls == ["http://a:1", "http://b:2"]
    assert again.findings_text == "midline shift\nmass effect" and again.heatmap_opacity == 0.7
    qt_like = MemorySettings({"SlicerHLIP/heatmapThreshold": "0.35", "SlicerHLIP/probabilityThreshold": "junk"})  # QSettings gives strings
    assert RememberedSettings(qt_like).heatmap_threshold == 0.35 and RememberedSettings(qt_like).probability_threshold == 0.5
    assert not list(tmp_path.glob(".settings-*"))  # written atomically, nothing left behind


def test_findings_text_is_one_finding_a_line():
    assert parse_findings_text("  midline   shift \n\n# a comment\nMass effect\nmass effect\nhydrocephalus") == [
        "midline shift", "Mass effect", "hydrocephalus"]
    with pytest.raises(ValueError, match="at least one finding"):
        parse_findings_text("\n  \n# only a comment")
    with pytest.raises(ValueError, match="Line 2 is 301 characters"):
        parse_findings_text("ok\n" + "x" * 301)
    with pytest.raises(ValueError, match="at most 2"):
        parse_findings_text("a\nb\nc", max_findings=2)
    regions = load_regions()
    assert [r.name for r in regions] == ["Head CT", "Brain MRI", "Chest CT"]
    assert region_named("brain mri").modality == "MR" and "glioma" in region_named("Brain MRI").findings
    with pytest.raises(KeyError, match="regions: Head CT"):
        region_named("knee")


def test_volumes_of_the_active_study_are_checked_by_default():
    t1 = LocalVolume("n1", "T1", study_uid="1.2.3")
    t2 = LocalVolume("n2", "T2", study_uid="1.2.3")
    other = LocalVolume("n3", "old CT", study_uid="9.9.9")
    loose = LocalVolume("n4", "from a file")
    served = [LocalVolume(f"s{i}", f"s{i}", server_study="study7", server_image=f"img{i}", server_study_images=("img0", "img1"))
              for i in range(2)]
    assert default_selection([t1, t2, other, loose], active_key="n2") == ["n1", "n2"]
    assert default_selection([t1, t2, other, loose], active_key="n4") == ["n4"]
    assert default_selection([t1, t2, loose]) == ["n1", "n2"]  # one study in the scene
    assert default_selection([t1, other]) == []  # two studies and nothing active: the user chooses
    assert default_selection([loose]) == ["n4"]
    assert default_selection([t1] + served, active_key="s1") == ["s0", "s1"]
    # a whole datastore study is asked by id; part of it, or a mix, is uploaded
    assert plan_question(served).study_id == "study7" and plan_question(served).uploads == []
    assert plan_question(served[:1]).study_id is None and plan_question(served[:1]).uploads == served[:1]
    assert plan_question([t1] + served).study_id is None
    with pytest.raises(ValueError, match="Choose the volumes"):
        plan_question([])


def test_table_rows_name_the_users_scan_and_flag_high_probabilities():
    rows = [FindingRow(0, "mass effect", 0.81, 0.12, "scan01", "scan01", "scan01.nii", None),
            FindingRow(1, "hydrocephalus", 0.2, -0.1, "x", "FLAIR axial", "unknown.nii", None)]
    table = table_rows(FindingsResult("s", rows, {}, [], 5.0), {"scan01.nii": "T2 axial (node)"}, threshold=0.5)
    assert [r["Scan"] for r in table] == ["T2 axial (node)", "FLAIR axial"]
    assert [r["Flag"] for r in table] == ["above threshold", ""]
    assert table[0]["Probability"] == 0.81


def test_the_servers_default_findings_are_offered_beside_the_regions():
    regions = load_regions()
    offered = with_server_defaults(regions, ["midline shift", "mass effect"])
    assert [r.name for r in offered] == ["Head CT", "Brain MRI", "Chest CT", "Server defaults"]
    server = region_named("server defaults", offered)
    assert server.findings == ["midline shift", "mass effect"] and server.from_server and server.modality == ""
    assert not any(r.from_server for r in regions)  # the body regions are left as they were
    # another server replaces the list; a server without defaults removes it
    again = with_server_defaults(offered, ["hydrocephalus"], name="Valeurs du serveur")
    assert [r.name for r in again] == ["Head CT", "Brain MRI", "Chest CT", "Valeurs du serveur"]
    assert region_named("Valeurs du serveur", again).findings == ["hydrocephalus"]
    assert [r.name for r in with_server_defaults(again, [])] == ["Head CT", "Brain MRI", "Chest CT"]
    findings = [f"finding {i}" for i in range(11)]
    assert findings_preview(findings) == (findings[:8], 3)
    assert findings_preview(findings[:2], limit=8) == (findings[:2], 0)
    assert findings_preview([], limit=3) == ([], 0)


def test_the_connect_answer_names_every_model_and_the_default_findings():
    info = {"name": "HLIP", "version": "0.1.0", "datastore": {"total": 2},
            "models": {"segmentation_spleen": {"type": "segmentation", "labels": ["spleen"]},
                       "hlip_findings": {"type": "hlip_findings", "labels": ["midline shift", "mass effect"],
                                         "config": {"heatmaps": False, "max_findings": 12}, "description": "findings"}}}
    with static_server({"/info/": (200, "application/json", json.dumps(info).encode())}) as url:
        server = HLIPClient(url).connect()
    assert server.model == "hlip_findings" and server.default_findings == ["midline shift", "mass effect"]
    assert server.models == {"segmentation_spleen": "segmentation", "hlip_findings": "hlip_findings"}
    assert not server.heatmaps and server.max_findings == 12 and server.datastore == {"total": 2}


def test_view_rows_map_to_the_findings_table_rows_and_numbers_sort_by_value():
    # column titles in the header (as the module sets the table node): model row r is table row r
    assert [table_row_of_model_row(r, True, 3) for r in range(4)] == [0, 1, 2, None]
    # otherwise Slicer's table model shows the column names as row 0: the first finding is model row 1
    assert [table_row_of_model_row(r, False, 3) for r in range(5)] == [None, 0, 1, 2, None]
    for titles in (True, False):
        assert [table_row_of_model_row(model_row_of_table_row(t, titles), titles, 3) for t in range(3)] == [0, 1, 2]
    rows = [FindingRow(0, "Mass effect", 0.81, -0.05, "s1", "T2", "scan01.nii", None),
            FindingRow(1, "hydrocephalus", 0.2, -0.1, "s1", "T2", "scan01.nii", None),
            FindingRow(2, "atrophy", 0.00001, 0.3, "s2", "FLAIR", "scan02.nii", None)]
    table = table_rows(FindingsResult("s", rows, {}, [], 1.0), threshold=0.5)
    keys = [table_sort_keys(r) for r in table]
    assert [len(k) for k in keys] == [len(TABLE_COLUMNS)] * 3
    names = [name for name, _ in TABLE_COLUMNS]
    by = lambda column: [table[i]["Finding"] for i in sorted(range(3), key=lambda i: keys[i][names.index(column)])]  # noqa: E731
    assert by("Score") == ["hydrocephalus", "Mass effect", "atrophy"]  # -0.1 < -0.05 < 0.3 (as text: "-0.05" < "-0.1")
    assert by("Probability") == ["atrophy", "hydrocephalus", "Mass effect"]  # 0.0 < 0.2 < 0.81
    assert by("Finding") == ["atrophy", "hydrocephalus", "Mass effect"]  # case does not matter
    assert [is_flagged(r) for r in table] == [True, False, False]


# -- background work -------------------------------------------------------------------------------------


def test_a_background_task_reports_progress_and_stops_when_cancelled():
    seen = threading.Event()

    def work(progress, cancel):
        for i in range(1000):
            progress(i / 1000, f"step {i}")
            seen.set()
            cancel.check()
            time.sleep(0.005)
        return "finished"

    task = BackgroundTask(work).start()
    seen.wait(5)
    fraction, message = task.progress.snapshot()
    assert 0 <= fraction < 1 and message.startswith("step")
    task.cancel()
    assert task.wait(5) and task.done
    with pytest.raises(Cancelled):
        task.result()
    done = BackgroundTask(lambda progress, cancel: 42).start()
    assert done.wait(5) and done.result() == 42
    failed = BackgroundTask(lambda progress, cancel: 1 / 0).start()
    assert failed.wait(5)
    with pytest.raises(ZeroDivisionError):
        failed.result()


# -- addresses that are not an HLIP server --------------------------------------------------------------------


def test_server_urls_are_normalised():
    assert normalize_url(" localhost:8000/ ") == "http://localhost:8000"
    assert normalize_url("https://hlip.example.org/monai/") == "https://hlip.example.org/monai"
    for bad, words in (("", "Type the server's address"), ("ftp://x", "must start with http"), ("http://:80", "names no host"),
                       ("http://h:port", "invalid port")):
        with pytest.raises(ValueError, match=words):
            normalize_url(bad)


def test_nothing_listening_is_said_in_words():
    with pytest.raises(ServerUnreachable, match=r"Server not reachable at http://127\.0\.0\.1:\d+; is it running\?"):
        HLIPClient(unused_port_url()).connect()


def test_a_web_server_that_is_not_monai_label_is_recognised():
    with static_server({}) as url, pytest.raises(NotHLIPServer, match="not a MONAI Label server") as e:
        HLIPClient(url).connect()
    assert "Check the URL" in str(e.value) and e.value.status == 404
    plain_label = {"/info/": (200, "application/json", json.dumps(
        {"name": "Radiology", "models": {"segmentation_spleen": {"type": "segmentation", "labels": ["spleen"]}}}).encode())}
    with static_server(plain_label) as url, pytest.raises(NotHLIPServer, match=r"no HLIP findings model \(its models: segmentation_spleen \(segmentation\)\)"):
        HLIPClient(url).connect()
    with static_server({"/info/": (200, "text/html", b"<html>welcome</html>")}) as url, pytest.raises(NotHLIPServer):
        HLIPClient(url).connect()


def test_a_server_that_never_answers_times_out_and_can_be_cancelled():
    with silent_server() as url:
        start = time.perf_counter()
        with pytest.raises(RequestTimeout, match="did not answer for its description within 0.5 s"):
            HLIPClient(url, timeout=0.5).connect()
        assert time.perf_counter() - start < 3
        client = HLIPClient(url, timeout=60)
        task = BackgroundTask(lambda progress, cancel: client.connect(cancel)).start()
        time.sleep(0.3)
        start = time.perf_counter()
        task.cancel()
        assert task.wait(5) and time.perf_counter() - start < 1.0
        with pytest.raises(Cancelled):
            task.result()
