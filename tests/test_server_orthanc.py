"""The HLIP app on a real PACS: a private Orthanc (Debian packages ``orthanc`` and
``orthanc-dicomweb``) on loopback, studies uploaded through its REST API, and a real
``monailabel start_server --studies http://127.0.0.1:<port>/dicom-web``.

Study A: two small MR series written with pydicom plus a structured report (not an image);
study B: the real T1w brain series excerpt of tests/data (every 2nd of its 48 slices); study C is uploaded while
the server runs and must be found and embedded in the background.
"""
import json
import os
import time

import pytest
import requests

from server_helpers import (make_checkpoint, monailabel_server, orthanc, parse_multipart, read_nifti_bytes, require_ingestion,
                            same_geometry, subsampled_real_mri, upload_to_orthanc, write_dicom_series)

STUDY_A, STUDY_C = "1.2.826.0.1.9.1", "1.2.826.0.1.9.3"


def report_file(folder, study_uid):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(folder / "sr.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.PatientID = study_uid, generate_uid(), "SR", "P001"
    ds.save_as(str(folder / "sr.dcm"), write_like_original=False)
    return folder / "sr.dcm"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    require_ingestion()
    import pydicom

    tmp = tmp_path_factory.mktemp("orthanc")
    data = tmp / "data"
    a1 = write_dicom_series(data / "a1", STUDY_A, STUDY_A + ".1", description="T1 axial", seed=1)
    a2 = write_dicom_series(data / "a2", STUDY_A, STUDY_A + ".2", description="T2 axial", seed=2, series_number=2)
    real = subsampled_real_mri(data / "real", every=2)
    study_b = str(pydicom.dcmread(real[0], stop_before_pixels=True).StudyInstanceUID)
    real_series = str(pydicom.dcmread(real[0], stop_before_pixels=True).SeriesInstanceUID)
    with orthanc(tmp / "orthanc") as base:
        upload_to_orthanc(base, a1 + a2 + [report_file(data / "sr", STUDY_A)] + real)
        with monailabel_server(f"{base}/dicom-web", make_checkpoint(tmp / "ckpt"), tmp / "server",
                               {"cache_dir": tmp / "cache", "threads": 1, "rescan_seconds": 1}) as (server, _):
            deadline = time.monotonic() + 120
            while requests.get(f"{server}/hlip/status", timeout=10).json()["index"]["indexed"] < 2:
                assert time.monotonic() < deadline, requests.get(f"{server}/hlip/status", timeout=10).json()
                time.sleep(0.5)
            yield {"orthanc": base, "server": server, "tmp": tmp, "data": data, "study_b": study_b, "real_series": real_series}


def test_studies_are_the_study_uids_with_their_image_series(pacs):
    studies = {s["study_id"]: s for s in requests.get(f"{pacs['server']}/hlip/studies", timeout=10).json()["studies"]}
    assert set(studies) == {STUDY_A, pacs["study_b"]}
    assert [(s["image_id"], s["description"]) for s in studies[STUDY_A]["scans"]] == [(STUDY_A + ".1", "T1 axial"), (STUDY_A + ".2", "T2 axial")]
    assert [s["image_id"] for s in studies[pacs["study_b"]]["scans"]] == [pacs["real_series"]]
    assert all(s["embedded"] for s in studies.values())


def test_findings_and_heat_maps_for_a_pacs_study(pacs, tmp_path):
    server = pacs["server"]
    by_series = requests.post(f"{server}/infer/hlip_findings", params={"image": STUDY_A + ".2"}, json={"findings": ["mass effect"]}, timeout=120)
    by_study = requests.post(f"{server}/infer/hlip_findings", params={"image": STUDY_A}, json={"findings": ["mass effect"]}, timeout=120)
    assert by_series.status_code == by_study.status_code == 200
    assert by_series.json()["study_id"] == by_study.json()["study_id"] == STUDY_A
    assert by_series.json()["findings"][0]["probability"] == by_study.json()["findings"][0]["probability"]

    r = requests.post(f"{server}/infer/hlip_findings", params={"image": pacs["study_b"]},
                      files={"params": (None, json.dumps({"findings": ["brain atrophy", "hydrocephalus"], "heatmaps": True}))}, timeout=120)
    assert r.status_code == 200, r.text
    parts = parse_multipart(r.headers["Content-Type"], r.content)
    result = json.loads(parts["params"][2])
    volume = requests.get(f"{server}/datastore/image", params={"image": pacs["real_series"]}, timeout=120)
    assert volume.status_code == 200
    series_image = read_nifti_bytes(volume.content, tmp_path, "series.nii.gz")
    assert series_image.GetSize()[2] == 24  # the excerpt's 48 slices, every 2nd
    for f in result["findings"]:
        assert f["image_id"] == pacs["real_series"]
        assert same_geometry(read_nifti_bytes(parts[f["heatmap"]][2], tmp_path, f["heatmap"] + ".nii.gz"), series_image, tol=1e-3)


def test_search_and_similarity_over_the_pacs(pacs):
    server = pacs["server"]
    found = requests.get(f"{server}/hlip/search", params={"text": "normal brain mri"}, timeout=10).json()
    assert sorted(r["study_id"] for r in found["results"]) == sorted([STUDY_A, pacs["study_b"]])
    similar = requests.get(f"{server}/hlip/similar", params={"study": pacs["real_series"]}, timeout=10).json()
    assert [r["study_id"] for r in similar["results"]] == [STUDY_A]


def test_a_study_added_to_the_pacs_is_found_and_embedded(pacs):
    server = pacs["server"]
    upload_to_orthanc(pacs["orthanc"], write_dicom_series(pacs["data"] / "c1", STUDY_C, STUDY_C + ".1", description="DWI", seed=5))
    deadline = time.monotonic() + 60
    while True:
        studies = {s["study_id"]: s for s in requests.get(f"{server}/hlip/studies", timeout=10).json()["studies"]}
        if STUDY_C in studies and studies[STUDY_C]["embedded"]:
            break
        assert time.monotonic() < deadline, f"study C not embedded: {studies.get(STUDY_C)}"
        time.sleep(0.5)
    found = requests.get(f"{server}/hlip/search", params={"text": "diffusion restriction", "k": 5}, timeout=10).json()
    assert STUDY_C in [r["study_id"] for r in found["results"]] and found["indexed"] == 3


def test_pacs_ids_cannot_reach_files(pacs):
    server, cache = pacs["server"], pacs["tmp"] / "cache"
    for image in ["../../../../etc/passwd", "..", f"{STUDY_A}/..", "1.2.3.4.5.6.7.8.9"]:
        r = requests.get(f"{server}/datastore/image", params={"image": image}, timeout=30)
        assert r.status_code in (400, 404) and "detail" in r.json()
        r = requests.post(f"{server}/infer/hlip_findings", params={"image": image}, json={"findings": ["a"]}, timeout=30)
        assert r.status_code in (400, 404) and "detail" in r.json()
    known = {STUDY_A + ".1", STUDY_A + ".2", STUDY_C + ".1", pacs["real_series"]}
    downloaded = {p.name for p in (cache / "dicomweb").glob("*/*") if p.is_dir() and p.parent.name != "volumes"
                  and not p.name.startswith((".", "labels"))}
    converted = {p.name[: -len(".nii.gz")] for p in (cache / "dicomweb" / "volumes").glob("*.nii.gz")}
    assert downloaded <= known and converted <= known and pacs["real_series"] in converted, (downloaded, converted)
    assert not (pacs["tmp"] / "server" / "home" / ".cache" / "monailabel").exists()  # MONAI Label's default cache unused
    assert not os.path.exists("/etc/passwd.nii.gz")
