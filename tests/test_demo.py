"""The embedded demo: the generated studies say what their reports say, and a short run learns.

The full demo (held-out macro AUC and wall time) is measured by ``benchmarks/train.py --demo``.
"""
import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from hlip_core.demo import DEMO_TRAINING, FINDINGS, build_demo
from hlip_core.demo.build import _study_rng, study_id
from hlip_core.demo.reports import write_report
from hlip_core.demo.synth import CHANNELS, Anatomy, draw_study, present_channels, template_channels


@pytest.fixture(scope="module")
def anatomy():
    return Anatomy.load()


def test_each_drawn_finding_is_planted_in_the_anatomy_and_written_in_the_report(anatomy):
    seen = {f: 0 for f in FINDINGS}
    impressions = 0
    for index in range(40):
        rng = _study_rng(0, "train", index)
        spec = draw_study(anatomy, rng, study_id("train", index))
        report = write_report(spec, rng).lower()
        assert report.strip()
        if "impression:" in report:  # the impression comes last and is normal exactly when the study is
            impressions += 1
            impression = report[report.index("impression:"):]
            normal = any(w in impression for w in ("normal study", "no acute intracranial abnormality", "unremarkable"))
            assert normal == (not any(spec.labels.values())), report
        for f, present in spec.labels.items():
            seen[f] += present
        if spec.labels["mass"] or spec.labels["haemorrhage"] or spec.labels["infarct"]:
            channels = template_channels(anatomy, spec)  # gm, wm, csf, mask, core, oedema, blood, infarct
            for f, channel in (("mass", 4), ("haemorrhage", 6), ("infarct", 7)):
                volume_ml = float(channels[channel].sum()) * 8 / 1000  # 2 mm template voxels
                assert (volume_ml > 1.0) == bool(spec.labels[f]), (f, volume_ml)
        assert (spec.ventricle_scale > 1.5) == bool(spec.labels["atrophy"])
        assert (abs(spec.shift_mm) >= 10) == bool(spec.labels["midline_shift"])
        if not any(spec.labels.values()):
            assert not spec.lesions
    assert all(5 <= n <= 25 for n in seen.values()), seen  # every finding occurs, none in every study
    assert 20 <= impressions < 40  # most reports end with an impression, not all


def test_only_the_channels_a_study_uses_are_built_and_they_equal_the_full_set(anatomy):
    """Rendering builds and samples only the tissue channels a study's findings fill; they must be
    the same as those of the full set, and the ones left out empty there."""
    kinds_seen = set()
    for index in range(12):
        rng = _study_rng(0, "train", index)
        spec = draw_study(anatomy, rng, study_id("train", index))
        names = present_channels(spec)
        kinds_seen |= {lesion.kind for lesion in spec.lesions}
        full = template_channels(anatomy, spec)
        some = template_channels(anatomy, spec, names)
        assert some.shape[0] == len(names) and set(names) >= {"gm", "wm", "csf", "mask"}
        for name in CHANNELS:
            if name in names:
                assert torch.equal(some[names.index(name)], full[CHANNELS.index(name)]), (spec.study_id, name)
            else:
                assert float(full[CHANNELS.index(name)].abs().max()) == 0.0, (spec.study_id, name)
        if not spec.lesions:
            assert names == ("gm", "wm", "csf", "mask")
    assert kinds_seen == {"mass", "haemorrhage", "infarct"}  # every kind of focal finding was checked


def test_the_demo_is_written_as_a_user_archive_and_rebuilt_identically(tmp_path):
    first = build_demo(tmp_path / "a", train_studies=6, test_studies=3, workers=1, progress=False)
    again = build_demo(tmp_path / "b", train_studies=6, test_studies=3, workers=1, progress=False)
    rows = list(csv.DictReader(open(first.test_reports, encoding="utf-8")))
    assert [r["study_id"] for r in rows] == [f"demo-test-{i:04d}" for i in range(3)]
    assert set(rows[0]) == {"study_id", "report", *FINDINGS}
    assert rows == list(csv.DictReader(open(again.test_reports, encoding="utf-8")))
    for study in sorted(first.test_studies.iterdir()):
        files = sorted(study.glob("*.nii.gz"))
        assert 3 <= len(files) <= 4  # several contrasts per study, sometimes one missing
        for path in files:
            image = nib.load(path)
            assert image.ndim == 3 and np.linalg.det(image.affine[:3, :3]) != 0
            other = nib.load(again.test_studies / study.name / path.name)
            assert np.array_equal(np.asarray(image.dataobj), np.asarray(other.dataobj))
    lines = (first.train / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert build_demo(tmp_path / "a", train_studies=6, test_studies=3, workers=1, progress=False).train == first.train  # found, not rebuilt


def test_a_short_demo_run_learns_findings_it_is_asked_about_zero_shot(tmp_path):
    """Held-out studies the model never saw; a few minutes on 2 cores. Chance is 0.5."""
    from hlip_core.training import TrainConfig, train

    demo = build_demo(tmp_path / "demo", train_studies=240, test_studies=64, progress=False)
    settings = {**DEMO_TRAINING, "steps": 200, "batch_size": 16, "warmup_steps": 20, "eval_every": 200,
                "checkpoint_every": 200, "progress": False, "tensorboard": False}
    result = train(TrainConfig(data=str(demo.train), eval_data=str(demo.test), eval_prompts=str(demo.prompts),
                               out=str(tmp_path / "run"), **settings))
    auc = result.evaluation
    assert auc["studies"] == 64
    assert max(auc["auc"].values()) > 0.85, auc  # at least one finding is clearly learnt
    assert auc["macro_auc"] > 0.6, auc
