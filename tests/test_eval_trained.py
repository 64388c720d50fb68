"""Zero-shot findings and heat maps of a tiny model trained (in this session) to find a planted lesion."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from hlip_core.eval import ZeroShotClassifier, findings_from_text, load_prompt_set
from hlip_core.eval.saliency import relevance_maps

from planted import LESION


def test_zero_shot_beats_chance_on_held_out_studies(lesion_model, held_out):
    x, y, _ = held_out
    with torch.no_grad():
        z = lesion_model.encode_study(x)
    out = ZeroShotClassifier(lesion_model).scores(z, findings_from_text(["bright lesion"]))
    auc = roc_auc_score(y, out["probability"][:, 0].numpy())
    assert auc > 0.75, f"held-out zero-shot AUC {auc:.3f}"
    # the softmax over the pair is a monotone function of the cosine difference: same ranking
    assert roc_auc_score(y, out["cosine"][:, 0].numpy()) == pytest.approx(auc)
    p, c = out["probability"][:, 0].numpy(), out["cosine"][:, 0].numpy()
    higher_cosine = c[:, None] > c[None, :]
    assert (p[:, None] >= p[None, :])[higher_cosine].all()  # never ranked the other way (ties allowed where p saturates)


def test_an_ensemble_of_phrasings_is_the_mean_over_phrasings_and_templates(lesion_model, held_out, tmp_path):
    templates = ["{}.", "The study shows {}."]
    phrasings = ("bright lesion", "a bright focal lesion", "hyperintense lesion")
    clf = ZeroShotClassifier(lesion_model, templates=templates)
    with torch.no_grad():
        each = F.normalize(lesion_model.encode_text([t.format(p) for p in phrasings for t in templates]).float(), dim=-1)
    got = clf.embed_prompts([phrasings, "bright lesion", ("bright lesion",)])
    assert torch.allclose(got[0], F.normalize(each.mean(0), dim=-1), atol=1e-5)
    assert torch.allclose(got[1], got[2])  # an ensemble of one phrasing is that phrasing
    assert not torch.allclose(got[0], got[1], atol=1e-3)
    with pytest.raises(ValueError, match="empty ensemble"):
        clf.embed_prompts([()])

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"name": "lesion", "templates": templates, "findings": [
        {"name": "lesion", "positive": list(phrasings), "negative": ["no bright lesion", "no focal lesion"]}]}))
    finding = load_prompt_set(path).findings[0]
    assert finding.positive == phrasings and finding.negative == ("no bright lesion", "no focal lesion")
    x, y, _ = held_out
    with torch.no_grad():
        z = lesion_model.encode_study(x)
    out = clf.scores(z, [finding])
    negatives = clf.embed_prompts([finding.negative])
    expected = F.normalize(z.float(), dim=-1) @ (got[0] - negatives[0])
    assert torch.allclose(out["cosine"][:, 0], expected, atol=1e-5)
    assert roc_auc_score(y, out["cosine"][:, 0].numpy()) > 0.75


def test_heat_map_peaks_on_the_planted_lesion(lesion_model, held_out):
    x, _, boxes = held_out
    clf = ZeroShotClassifier(lesion_model)
    direction = clf.embed_prompts(["bright lesion"]) - clf.embed_prompts(["no bright lesion"])
    margin = (4, 8, 8)  # one patch around the box (the map's resolution)
    hits, right_scan, n = 0, 0, 0
    for i, box in enumerate(boxes):
        if box is None:
            continue
        maps, share = relevance_maps(lesion_model, x[i : i + 1], None, direction)
        scan, *corner = box
        s, *peak = np.unravel_index(int(maps[0].flatten().argmax()), maps[0].shape)
        inside = s == scan and all(c - m <= p < c + size + m for c, p, size, m in zip(corner, peak, LESION, margin))
        hits += inside
        right_scan += int(share[0].argmax()) == scan
        n += 1
    assert hits >= 0.8 * n, f"heat-map maximum on the lesion in {hits}/{n} studies"
    assert right_scan >= 0.8 * n, f"driving scan right in {right_scan}/{n} studies"
