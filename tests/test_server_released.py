"""The MONAI Label app with a released Hugging Face folder as its checkpoint (``--conf checkpoint FOLDER``),
in process: findings and text search are answered, studies are prepared with the released preset,
the index holds the report embedding (token 1 of a dual model) and findings use token 0."""

import numpy as np
import pytest
import torch

from released_factory import TRAP_MARKER, write_released_folder
from server_helpers import APP_DIR, require_ingestion, wait_until_indexed, write_nifti_study

NAME = "tiny_multiscan_h2_dualdinotxt"
FINDINGS = ["intracranial haemorrhage", "mass effect"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_ingestion()
    from fastapi.testclient import TestClient
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import apps

    tmp = tmp_path_factory.mktemp("released-server")
    folder = tmp / "hlip-released"
    writer = write_released_folder(folder, NAME)
    studies = tmp / "studies"
    write_nifti_study(studies / "nifti1", seed=1)
    write_nifti_study(studies / "nifti2", n_scans=3, seed=2)
    saved = (settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES, settings.MONAI_LABEL_APP_CONF)
    settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES = str(APP_DIR), str(studies)
    settings.MONAI_LABEL_APP_CONF = {"checkpoint": str(folder), "cache_dir": str(tmp / "cache"), "rescan_seconds": "1", "threads": "1"}
    import monailabel_app.asgi  # noqa: F401  (installs the HLIP routes on MONAI Label's app)
    from monailabel.app import app

    key = f"{APP_DIR}{studies}"
    try:
        with TestClient(app) as client:
            from monailabel.interfaces.utils.app import app_instance

            service = app_instance().hlip
            wait_until_indexed(service, 2, timeout=120)
            yield {"client": client, "service": service, "writer": writer, "folder": folder}
    finally:
        apps.pop(key, None)  # this app instance (its model, its studies) is not reused by later tests
        settings.MONAI_LABEL_APP_DIR, settings.MONAI_LABEL_STUDIES, settings.MONAI_LABEL_APP_CONF = saved


def test_the_released_folder_is_served_with_its_own_preset(server):
    predictor = server["service"].task.predictor
    assert predictor.settings.preset == "released" and predictor.settings.target_shape == (32, 64, 64)
    assert predictor.model.config["released"]["timm_model_name"] == NAME and predictor.model.config["loss"] == "dual"
    assert not (server["folder"] / TRAP_MARKER).exists()  # the folder's vendored code never ran


def test_findings_are_answered_from_token_0(server):
    client, service = server["client"], server["service"]
    answer = client.post("/infer/hlip_findings", params={"image": "nifti2"}, json={"findings": FINDINGS})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["findings"]
    assert [r["finding"] for r in rows] == FINDINGS and all(0 <= r["probability"] <= 1 for r in rows)
    # the same scores from the writer's token 0 and the classifier's prompt embeddings
    predictor = service.task.predictor
    prepared = service.task.prepare(service.resolve("nifti2"), service.files_of)
    x = prepared.tensor()
    with torch.no_grad():
        z = server["writer"].encode_study(x)
    expected = predictor.score(z, predictor._findings(FINDINGS))
    np.testing.assert_allclose([r["probability"] for r in rows], np.asarray(expected["probability"])[0], atol=1e-5)


def test_search_ranks_by_the_report_embedding_token_1(server):
    client, service = server["client"], server["service"]
    found = client.get("/hlip/search", params={"text": "mass effect and midline shift", "k": 5}).json()
    assert found["indexed"] == 2 and sorted(r["study_id"] for r in found["results"]) == ["nifti1", "nifti2"]
    writer = server["writer"]
    with torch.no_grad():
        text = writer.encode_text(writer.tokenizer(["mass effect and midline shift"]))[0]
        for row in found["results"]:
            prepared = service.task.prepare(service.resolve(row["study_id"]), service.files_of)
            x = prepared.tensor()
            report, findings = writer.encode_study_for_reports(x)[0], writer.encode_study(x)[0]
            assert row["score"] == pytest.approx(float(report @ text), abs=1e-4)
            assert abs(float(findings @ text) - float(report @ text)) > 1e-4  # token 0 would give another score
