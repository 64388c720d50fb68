"""Zero-shot findings and heat maps of a tiny model trained (in this session) to find a planted lesion."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hlip_core.eval import ZeroShotClassifier, findings_from_text
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
