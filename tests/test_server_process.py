"""One real ``monailabel start_server`` process with the HLIP app on a free loopback port: info,
findings with heat maps over HTTP, search, /info/ while the model runs, a bounded load test; then
a restart of the same server with MONAI Label's authentication switched on, which must find its
embedding cache on disk and refuse unauthenticated clients with 401."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from server_helpers import (IdentityProvider, assert_info_not_queued, make_checkpoint, monailabel_server, parse_multipart,
                            read_nifti_bytes, require_ingestion, same_geometry, write_dicom_series, write_nifti_study)

N_STUDIES = 4
TEXTS = ["mass effect", "intracranial hemorrhage", "normal brain", "acute infarct", "white matter lesions"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_ingestion()
    tmp = tmp_path_factory.mktemp("process")
    studies = tmp / "studies"
    for i in range(3):
        write_nifti_study(studies / f"study{i}", seed=10 + i)
    write_dicom_series(studies / "dicomstudy" / "a", "1.2.826.0.1.8", "1.2.826.0.1.8.1", description="FLAIR")
    return {"tmp": tmp, "studies": studies, "checkpoint": make_checkpoint(tmp / "ckpt"), "cache": tmp / "cache"}


def conf(setup):
    # findings without spaces: MONAI Label's `monailabel` launcher re-splits its arguments on spaces
    return {"cache_dir": setup["cache"], "threads": 1, "rescan_seconds": 1, "findings": "hemorrhage;infarct"}


@pytest.fixture(scope="module")
def server(setup):
    with monailabel_server(str(setup["studies"]), setup["checkpoint"], setup["tmp"] / "run1", conf(setup)) as (base, proc):
        deadline = time.monotonic() + 90
        while requests.get(f"{base}/hlip/status", timeout=5).json()["index"]["indexed"] < N_STUDIES:
            assert time.monotonic() < deadline, "the embedding cache did not fill"
            time.sleep(0.3)
        yield base, proc


def test_info_names_the_model_and_its_default_findings(server):
    base, _ = server
    info = requests.get(f"{base}/info/", timeout=10).json()
    assert info["models"]["hlip_findings"]["type"] == "hlip_findings"
    assert info["models"]["hlip_findings"]["labels"] == ["hemorrhage", "infarct"]


def test_findings_with_heat_maps_over_http(server, setup, tmp_path):
    import SimpleITK as sitk

    base, _ = server
    r = requests.post(f"{base}/infer/hlip_findings", params={"image": "study1"},
                      files={"params": (None, json.dumps({"findings": ["mass effect", "midline shift"], "heatmaps": True}))}, timeout=60)
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.headers["Content-Type"], r.content)
    result = json.loads(parts["params"][2])
    assert result["study_id"] == "study1" and [f["finding"] for f in result["findings"]] == ["mass effect", "midline shift"]
    for f in result["findings"]:
        heatmap = read_nifti_bytes(parts[f["heatmap"]][2], tmp_path, f["heatmap"] + ".nii.gz")
        scan = sitk.ReadImage(str(setup["studies"] / "study1" / (f["image_id"].split("__")[1] + ".nii.gz")))
        assert same_geometry(heatmap, scan), (heatmap.GetSize(), scan.GetSize())

    r = requests.post(f"{base}/infer/hlip_findings", params={"image": "1.2.826.0.1.8.1"}, json={"findings": ["edema"], "heatmaps": True}, timeout=60)
    parts = parse_multipart(r.headers["Content-Type"], r.content)
    volume = requests.get(f"{base}/datastore/image", params={"image": "1.2.826.0.1.8.1"}, timeout=60)
    assert volume.status_code == 200
    assert same_geometry(read_nifti_bytes(parts["heatmap_0"][2], tmp_path), read_nifti_bytes(volume.content, tmp_path, "v.nii.gz"))



# -- MONAI Label's own client (monailabel.client.MONAILabelClient, what its Slicer and OHIF plug-ins use) --


def monai_client(base, tmp_path):
    from monailabel.client import MONAILabelClient

    return MONAILabelClient(base, tmpdir=str(tmp_path), client_id="test-client")


def test_monai_labels_client_reads_info_and_the_datastore(server, setup, tmp_path):
    client = monai_client(server[0], tmp_path)
    info = client.info()
    config = info["models"]["hlip_findings"]["config"]
    assert config["heatmap_format"] == ["parts", "zip"] and config["heatmap_scans"] == ["driving", "all"]
    datastore = client.datastore()
    objects = datastore["objects"]  # MONAI Label's format: one object per image, with its image info and labels
    assert len(objects) == 3 * 2 + 1 and all(set(o) == {"image", "labels"} for o in objects.values())
    assert sorted(datastore["studies"]) == ["dicomstudy", "study0", "study1", "study2"]
    for study, scans in datastore["studies"].items():  # the study grouping names the same images
        assert all(objects[sc["image_id"]]["image"]["info"]["study_id"] == study for sc in scans)
    assert objects["1.2.826.0.1.8.1"]["image"]["info"]["description"] == "FLAIR"


def test_monai_labels_client_asks_findings_without_and_with_heat_maps(server, setup, tmp_path):
    import zipfile

    import SimpleITK as sitk

    client = monai_client(server[0], tmp_path)
    out, answer = client.infer("hlip_findings", "study1", {"findings": ["mass effect"]})
    assert out is None and json.loads(answer)["findings"][0]["finding"] == "mass effect"  # its client hands a JSON answer back as bytes
    findings = ["mass effect", "midline shift", "edema"]
    out, answer = client.infer("hlip_findings", "study1", {"findings": findings, "heatmaps": True})
    assert answer["heatmap_file"] == "heatmaps.zip" and out.endswith("heatmaps.zip")  # the JSON part 'params' reached it
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted(f"{r['heatmap']}.nii.gz" for r in answer["findings"])
        for row in answer["findings"]:  # every finding's map, each on its driving scan
            (tmp_path / "m.nii.gz").write_bytes(z.read(f"{row['heatmap']}.nii.gz"))
            scan = sitk.ReadImage(str(setup["studies"] / "study1" / (row["image_id"].split("__")[1] + ".nii.gz")))
            assert same_geometry(sitk.ReadImage(str(tmp_path / "m.nii.gz")), scan)
    out, answer = client.infer("hlip_findings", "study1", {"findings": findings, "heatmaps": True, "heatmap_scans": "all"})
    with zipfile.ZipFile(out) as z:  # asked for: every scan's map, the driving scan's named by 'heatmap' too
        assert len(z.namelist()) == len(findings) * 2  # study1 has 2 scans
        for row in answer["findings"]:
            assert sorted(row["heatmaps"]) == ["scan0", "scan1"] and row["heatmaps"][row["scan_id"]] == row["heatmap"]
            assert {f"{n}.nii.gz" for n in row["heatmaps"].values()} <= set(z.namelist())


def test_monai_labels_client_sends_a_volume_with_the_request_and_uses_sessions(server, setup, tmp_path):
    from monailabel.client.client import MONAILabelClientException

    client = monai_client(server[0], tmp_path)
    volume = str(setup["studies"] / "study2" / "scan0.nii.gz")
    _, answer = client.infer("hlip_findings", "", {"findings": ["mass effect"]}, file=volume)
    by_file = json.loads(answer)
    assert by_file["findings"][0]["finding"] == "mass effect" and [s["scan_id"] for s in by_file["scans"]] == ["scan0"]
    session = client.create_session(volume)
    assert client.get_session(session["session_id"])["name"] == session["session_id"]
    _, answer = client.infer("hlip_findings", "", {"findings": ["mass effect"]}, session_id=session["session_id"])
    assert json.loads(answer)["findings"][0]["probability"] == pytest.approx(by_file["findings"][0]["probability"], abs=1e-6)
    client.remove_session(session["session_id"])
    with pytest.raises(MONAILabelClientException, match="404"):
        client.get_session(session["session_id"])
    (tmp_path / "notes.txt").write_text("not a volume")
    with pytest.raises(MONAILabelClientException, match="neither DICOM nor a NIfTI"):
        client.infer("hlip_findings", "", {"findings": ["mass effect"]}, file=str(tmp_path / "notes.txt"))


def test_search_finds_every_study(server):
    base, _ = server
    found = requests.get(f"{base}/hlip/search", params={"text": "midline shift", "k": 10}, timeout=10).json()
    assert found["indexed"] == N_STUDIES and found["pending"] == 0
    assert sorted(r["study_id"] for r in found["results"]) == ["dicomstudy", "study0", "study1", "study2"]
    similar = requests.get(f"{base}/hlip/similar", params={"study": "study0", "k": 2}, timeout=10).json()
    assert len(similar["results"]) == 2 and "study0" not in [r["study_id"] for r in similar["results"]]


def test_info_does_not_wait_for_the_model_to_finish(server):
    base, _ = server
    many = [f"finding {i}" for i in range(32)]
    busy = []
    with ThreadPoolExecutor(1) as pool:
        for attempt in range(6):
            job = pool.submit(requests.post, f"{base}/infer/hlip_findings", params={"image": f"study{attempt % 3}"},
                              json={"findings": many, "heatmaps": True}, timeout=120)
            with requests.Session() as s:
                while not job.done():
                    status = s.get(f"{base}/hlip/status", timeout=5).json()["worker"]
                    start = time.perf_counter()
                    assert s.get(f"{base}/info/", timeout=5).status_code == 200
                    latency = time.perf_counter() - start
                    if status["busy"] and s.get(f"{base}/hlip/status", timeout=5).json()["worker"]["busy"]:
                        busy.append(latency)  # the model ran before and after this /info/
            assert job.result().status_code == 200
            if len(busy) >= 10:
                break
    assert len(busy) >= 10, f"only {len(busy)} /info/ calls overlapped an inference"
    assert_info_not_queued(busy)


def test_200_requests_from_8_clients_all_succeed_without_memory_growth(server):
    import psutil

    base, proc = server
    process = psutil.Process(proc.pid)
    studies = ["study0", "study1", "study2", "dicomstudy"]

    def one(i: int) -> int:
        kind = i % 4
        if kind == 0:
            r = requests.post(f"{base}/infer/hlip_findings", params={"image": studies[(i // 4) % 4]},
                              json={"findings": [TEXTS[i % 5], TEXTS[(i + 1) % 5]]}, timeout=120)
        elif kind == 1:
            r = requests.get(f"{base}/hlip/search", params={"text": TEXTS[i % 5], "k": 3}, timeout=60)
        elif kind == 2:
            r = requests.get(f"{base}/info/", timeout=60)
        else:
            r = requests.get(f"{base}/hlip/similar", params={"study": studies[i % 4]}, timeout=60)
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        warm = list(pool.map(one, range(40)))
        rss = [process.memory_info().rss]
        first = list(pool.map(one, range(100)))
        rss.append(process.memory_info().rss)
        second = list(pool.map(one, range(100, 200)))
        rss.append(process.memory_info().rss)
    codes = warm + first + second
    assert codes.count(200) == len(codes), f"failed requests: {[c for c in codes if c != 200]}"
    growth = (rss[2] - rss[1]) / 2**20
    assert growth < 16, f"the server's memory grew by {growth:.1f} MB over the second 100 requests (RSS {[r >> 20 for r in rss]} MB)"


def test_a_restart_with_auth_keeps_the_cache_and_refuses_strangers(server, setup):
    _, first = server
    from server_helpers import stop_process

    stop_process(first)  # the same cache folder, one server at a time
    users = {"radiologist": ("secret", ["monailabel-user"]), "visitor": ("guest", [])}
    with IdentityProvider(users) as idp:
        env = {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": idp.realm}
        with monailabel_server(str(setup["studies"]), setup["checkpoint"], setup["tmp"] / "run2", conf(setup), env=env) as (base, _):
            for method, url in [("get", "/info/"), ("get", "/hlip/search?text=mass"), ("get", "/hlip/studies"),
                                ("post", "/infer/hlip_findings?image=study0"), ("get", "/datastore/image?image=study0__scan0")]:
                r = getattr(requests, method)(base + url, timeout=10)
                assert r.status_code == 401 and "detail" in r.json(), (url, r.status_code, r.text)

            refused = requests.post(f"{base}/auth/token", data={"username": "radiologist", "password": "wrong"}, timeout=10)
            assert refused.status_code == 401, refused.text
            token = requests.post(f"{base}/auth/token", data={"username": "radiologist", "password": "secret"}, timeout=10).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            status = requests.get(f"{base}/hlip/status", headers=auth, timeout=10).json()
            assert status["index"]["indexed"] == N_STUDIES and status["index"]["pending"] == 0  # loaded from disk, not embedded again
            assert status["worker"]["done"] == 0
            assert requests.get(f"{base}/info/", headers=auth, timeout=10).status_code == 200
            r = requests.post(f"{base}/infer/hlip_findings", params={"image": "study2"}, json={"findings": ["mass effect"]}, headers=auth, timeout=60)
            assert r.status_code == 200, r.text

            from cryptography.hazmat.primitives.asymmetric import rsa

            forged = idp.token("radiologist", ["monailabel-user"], key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
            expired = idp.token("radiologist", ["monailabel-user"], lifetime=-60)
            for bad in (forged, expired, "not-a-token"):
                assert requests.get(f"{base}/info/", headers={"Authorization": f"Bearer {bad}"}, timeout=10).status_code == 401
            no_role = requests.post(f"{base}/auth/token", data={"username": "visitor", "password": "guest"}, timeout=10).json()["access_token"]
            assert requests.get(f"{base}/hlip/search", params={"text": "mass"}, headers={"Authorization": f"Bearer {no_role}"}, timeout=10).status_code == 403
            assert requests.get(f"{base}/logs/", headers=auth, timeout=10).status_code == 403  # the log is for admins only
            admin = idp.token("radiologist", ["monailabel-user", "monailabel-admin"])
            assert requests.get(f"{base}/logs/", headers={"Authorization": f"Bearer {admin}"}, timeout=10).status_code == 200
