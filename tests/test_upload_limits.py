"""Issue 20 items 1 and 3 at the library level: hlip_core.data.limits refuses what would expand
past the limit before allocating, truncated and non-finite NIfTI files with the byte counts, and
the ingestion skips them with a reason instead of scoring zero-filled data; the sessions' disk cap
expires the least recently used session first."""
import io
import os
import resource
import time
import zipfile

import numpy as np
import pytest

from hlip_core.data import load_study
from hlip_core.data.limits import (DEFAULT_MAX_VOXELS, VolumeInconsistent, VolumeTooLarge, check_dicom_file, check_volume_file,
                                   copy_capped)
from hostile import write_gzip_bomb, write_nifti
from server_helpers import write_dicom_series

VOLUME = (np.arange(12 * 16 * 20, dtype=np.float32).reshape(12, 16, 20) % 97) * 3.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_the_gzip_bomb_is_refused_from_its_header_without_memory(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.nii.gz")
    assert os.path.getsize(bomb) < 8 << 20
    before = peak_rss_mb()
    start = time.perf_counter()
    with pytest.raises(VolumeTooLarge, match=r"1,073,741,824 voxels.*536,870,912.*max_voxels"):
        check_volume_file(bomb)
    assert time.perf_counter() - start < 1.0
    assert peak_rss_mb() - before < 100
    study = load_study([str(bomb)])
    assert not study.scans and [s.reason for s in study.skipped] == ["too_large"]
    assert peak_rss_mb() - before < 100


def test_a_bomb_under_the_voxel_limit_is_still_read_with_a_running_cap(tmp_path):
    # 256 x 512 x 512 float32 = 512 MB expanded, under a 2^28-voxel limit: streamed, never held
    bomb = write_gzip_bomb(tmp_path / "zeros.nii.gz", shape=(512, 512, 256))
    before = peak_rss_mb()
    check_volume_file(bomb, max_voxels=1 << 28)
    assert peak_rss_mb() - before < 50


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_a_truncated_volume_is_refused_with_the_byte_counts(tmp_path, name):
    path = write_nifti(tmp_path / name, VOLUME, keep_bytes=352 + VOLUME.nbytes - 1000)
    with pytest.raises(VolumeInconsistent, match=f"announces {VOLUME.nbytes:,} bytes.*holds {VOLUME.nbytes - 1000:,}"):
        check_volume_file(path)
    study = load_study([str(path)])
    assert not study.scans and study.skipped[0].reason == "truncated"


def test_a_cut_gzip_stream_is_refused(tmp_path):
    whole = write_nifti(tmp_path / "whole.nii.gz", VOLUME)
    data = whole.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeInconsistent, match="corrupt or truncated gzip"):
        check_volume_file(cut)


def test_non_finite_voxels_are_refused_and_whole_volumes_pass(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", VOLUME)
    check_volume_file(good)
    bad = VOLUME.copy()
    bad[3, 4, 5], bad[-1, -1, -1] = np.nan, np.inf
    path = write_nifti(tmp_path / "nan.nii.gz", bad)
    with pytest.raises(VolumeInconsistent, match="2 non-finite voxels"):
        check_volume_file(path)
    study = load_study([str(path), str(good)], min_slices=1)
    assert len(study.scans) == 1 and [s.reason for s in study.skipped] == ["non_finite"]


def test_dicom_rows_columns_frames_against_the_limit(tmp_path):
    path = write_dicom_series(tmp_path / "s", "1.2.826.0.1.99", n_slices=1, rows=32, cols=40)[0]
    check_dicom_file(path, max_voxels=32 * 40)
    with pytest.raises(VolumeTooLarge, match=r"1,280 voxels.*at most 1,279"):
        check_dicom_file(path, max_voxels=32 * 40 - 1)
    assert DEFAULT_MAX_VOXELS == 512 * 512 * 2048


def test_copy_capped_stops_at_the_cap_even_when_a_zip_member_lies_about_its_size(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.bin", bytes(8 << 20))
    with zipfile.ZipFile(buffer) as z, z.open("big.bin") as src:
        out = io.BytesIO()
        with pytest.raises(VolumeTooLarge, match="more than 1,048,576 bytes"):
            copy_capped(src, out, 1 << 20, "the member")
        assert out.tell() <= 1 << 20


def test_the_sessions_cap_expires_the_least_recently_used_first(tmp_path):
    from monailabel_app.lib.sessions import SessionsFull, StudySessions

    sessions = StudySessions(str(tmp_path / "store"), 3600, max_bytes=250_000)
    ids = []
    for i in range(3):
        f = tmp_path / f"scan{i}.bin"
        f.write_bytes(bytes(100_000))
        ids.append(sessions.add_study(str(f), 0, {})[0])
        time.sleep(0.01)
    assert sessions.get_session(ids[0], update_ts=False) is None  # the oldest went to make room
    assert all(sessions.get_session(i, update_ts=False) is not None for i in ids[1:])
    huge = tmp_path / "huge.bin"
    huge.write_bytes(bytes(300_000))
    with pytest.raises(SessionsFull, match="250,000"):
        sessions.add_study(str(huge), 0, {})
    assert huge.exists() and len(os.listdir(tmp_path / "store")) == 2


def test_a_half_written_session_is_removed_at_the_next_start(tmp_path):
    from monailabel_app.lib.sessions import StudySessions

    half = tmp_path / "store" / "0a1b2c"
    half.mkdir(parents=True)
    (half / "scan.nii.gz").write_bytes(b"partial")  # killed before meta.info was written
    StudySessions(str(tmp_path / "store"), 3600, max_bytes=1 << 20).remove_expired()
    assert not half.exists()


def test_sessions_added_read_and_removed_from_many_threads_never_fail(tmp_path):
    # the probe's failures: an upload's expiry pass read the meta.info of a session another thread
    # was deleting (MONAI Label's pass then fails with AttributeError or FileNotFoundError: a 500)
    from concurrent.futures import ThreadPoolExecutor

    from monailabel_app.lib.sessions import StudySessions

    sessions = StudySessions(str(tmp_path / "store"), 3600, max_bytes=1 << 30)

    def round_trip(i: int) -> None:
        f = tmp_path / f"scan{i}.bin"
        f.write_bytes(bytes(1000))
        session_id, _ = sessions.add_study(str(f), 0, {"modalities": {}})
        assert sessions.get_session(session_id, update_ts=True).meta == {"modalities": {}}
        sessions.remove_session(session_id)
        sessions.remove_expired()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(round_trip, range(800)))
    assert os.listdir(tmp_path / "store") == []
    (tmp_path / "store" / "cut").mkdir()
    (tmp_path / "store" / "cut" / "meta.info").write_text("")  # killed while meta.info was written
    assert sessions.remove_expired() == 1 and os.listdir(tmp_path / "store") == []
