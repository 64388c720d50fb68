"""Issue 20 against a real ``monailabel start_server`` process: a gzip bomb is refused from its
header (413 naming --conf max_voxels) while the server's memory stays flat; truncated and NaN
volumes are refused (422) with the byte counts; refused uploads leave nothing in the temporary
area; files a killed server left there (and a half-written session) are gone after a start; the
sessions' disk cap (--conf sessions_max_bytes) expires the least recently used session."""
import threading
import time

import numpy as np
import psutil
import pytest
import requests

from hostile import write_gzip_bomb, write_nifti
from server_helpers import make_checkpoint, monailabel_server, require_ingestion, write_nifti_study

CAP = 1 << 20
SCAN = (np.arange(40 * 50 * 60, dtype=np.float32).reshape(40, 50, 60) % 251) * 7.0  # 480 kB raw


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_ingestion()
    tmp = tmp_path_factory.mktemp("safety")
    write_nifti_study(tmp / "studies" / "study0", seed=3)
    cache = tmp / "cache"
    (cache / "tmp" / "upload-stale").mkdir(parents=True)
    (cache / "tmp" / "upload-stale" / "part.nii.gz").write_bytes(b"\x1f\x8b partial upload of a killed server")
    (cache / "tmp" / "tmpab12cd.nii.gz").write_bytes(b"stale")
    half = cache / "sessions" / "5b0c0f2e-half-written"
    half.mkdir(parents=True)
    (half / "scan.nii.gz").write_bytes(b"partial")
    conf = {"cache_dir": cache, "threads": 1, "index": "false", "sessions_max_bytes": CAP}
    with monailabel_server(str(tmp / "studies"), make_checkpoint(tmp / "ckpt"), tmp / "run", conf) as (base, proc):
        yield {"base": base, "proc": proc, "cache": cache, "tmp": tmp, "half": half}


def leftovers(server) -> list[str]:
    return sorted(p.name for p in (server["cache"] / "tmp").iterdir())


def rss_mb(proc) -> float:
    p = psutil.Process(proc.pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def upload(server, *paths, timeout=60):
    files = [("files", (p.name, open(p, "rb"), "application/octet-stream")) for p in paths]
    try:
        return requests.put(f"{server['base']}/session/", files=files, timeout=timeout)
    finally:
        for _, (_, f, _) in files:
            f.close()


def test_a_start_removes_what_a_killed_server_left(server):
    assert leftovers(server) == []
    assert not server["half"].exists()


def test_the_gzip_bomb_is_refused_and_the_server_memory_stays_flat(server):
    bomb = write_gzip_bomb(server["tmp"] / "bomb.nii.gz")
    before = rss_mb(server["proc"])
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_mb(server["proc"]))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = upload(server, bomb)
    finally:
        done.set()
        sampler.join()
    assert r.status_code == 413, r.text
    assert "1,073,741,824 voxels" in r.json()["detail"] and "max_voxels" in r.json()["detail"]
    assert max(peak) - before < 300, f"server memory went from {before:.0f} MB to {max(peak):.0f} MB"
    assert leftovers(server) == []


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_a_truncated_upload_is_refused_with_the_byte_counts_and_leaves_nothing(server, name):
    path = write_nifti(server["tmp"] / name, SCAN, keep_bytes=352 + SCAN.nbytes // 2)
    r = upload(server, path)
    assert r.status_code == 422, r.text
    assert f"announces {SCAN.nbytes:,} bytes" in r.json()["detail"] and f"holds {SCAN.nbytes // 2:,}" in r.json()["detail"]
    assert leftovers(server) == []


def test_a_nan_upload_is_refused(server):
    bad = SCAN.copy()
    bad[1, 2, 3] = np.nan
    r = upload(server, write_nifti(server["tmp"] / "nan.nii.gz", bad))
    assert r.status_code == 422 and "1 non-finite voxels" in r.json()["detail"], r.text


def test_refused_stock_uploads_leave_nothing_in_the_temporary_area(server):
    scan = write_nifti(server["tmp"] / "whole.nii.gz", SCAN)
    with open(scan, "rb") as f:
        r = requests.put(f"{server['base']}/datastore/image", files={"file": ("whole.nii.gz", f)}, timeout=30)
    assert r.status_code == 405, r.text  # the folder datastore is read-only; MONAI Label's route spooled the file first
    assert leftovers(server) == []
    with open(scan, "rb") as f:
        r = requests.put(f"{server['base']}/model/hlip_findings", files={"file": ("model.pt", f)}, timeout=30)
    assert r.status_code >= 400
    assert leftovers(server) == []


def test_the_sessions_cap_expires_the_oldest_session(server):
    ids = []
    for i in range(3):  # ~440 kB each (random data barely compress) under a 1 MiB cap: the third expires the first
        rng = np.random.default_rng(i)
        r = upload(server, write_nifti(server["tmp"] / f"s{i}.nii.gz", rng.random(SCAN.shape, dtype=np.float32) * 100))
        assert r.status_code == 200, r.text
        ids.append(r.json()["session_id"])
        time.sleep(0.05)
    status = [requests.get(f"{server['base']}/session/{i}", timeout=10).status_code for i in ids]
    assert status == [404, 200, 200]
    sizes = sum(p.stat().st_size for p in (server["cache"] / "sessions").rglob("*") if p.is_file())
    assert sizes <= CAP
