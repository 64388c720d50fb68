"""The released 2025-10 architectures: dino.txt head, register tokens, no scan-index table.

Small random models against the plain per-partition formula of ``naive_reference`` (float64), the
padded batch path, patch dropout, heat maps for both tokens, and the full-size configurations'
shapes and parameter counts (built, never run).
"""
import pytest
import torch
import torch.nn.functional as F

import hlip_core
from hlip_core.eval.saliency import relevance_maps
from hlip_core.model.clip import build_trunk
from hlip_core.model.registry import get_config

from naive_reference import study_feature

H2 = ["scan", "scan", "study", "scan", "scan", "study"]
H3 = ["slice", "scan", "study", "slice", "scan", "study"]
ODD = ["study", "slice", "slice", "scan", "study", "slice"]


def released_trunk(levels, num_registers=1, scan_posemb=False, head="dinotxt", seed=0, num_heads=4, rope=None):
    torch.manual_seed(seed)
    vision = dict(img_size=[16, 32, 32], patch_size=[4, 8, 8], width=48, depth=len(levels), num_heads=num_heads,
                  mlp_ratio=2.0, max_scans=40, levels=list(levels), head=head, num_registers=num_registers,
                  scan_posemb=scan_posemb, rope=rope)
    trunk = build_trunk(vision).eval().double()
    with torch.no_grad():  # prefix tokens that differ from each other, so a wrong copy or average shows
        trunk.cls_token.normal_()
        if trunk.reg_token is not None:
            trunk.reg_token.normal_()
        for name, p in trunk.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return trunk


@pytest.mark.parametrize("levels", [H2, H3, ODD])
@pytest.mark.parametrize("num_registers,scan_posemb", [(0, True), (1, False), (2, True)])
def test_dinotxt_features_equal_the_plain_formula(levels, num_registers, scan_posemb):
    trunk = released_trunk(levels, num_registers, scan_posemb)
    sd = trunk.state_dict()
    assert ("sequential_posemb" in sd) == scan_posemb and ("reg_token" in sd) == (num_registers > 0)
    study = torch.rand(3, 1, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = trunk(study[None])[0]
    naive = study_feature(sd, levels, (4, 8, 8), 4, study, head="dinotxt")
    assert ours.shape == (1 + num_registers, 96)
    torch.testing.assert_close(ours, naive, atol=1e-10, rtol=1e-8)
    if num_registers:  # the register path is its own token, not a copy of the cls
        assert (ours[0] - ours[1]).abs().max() > 1e-3


ROPE = {"base": 10000.0}


@pytest.mark.parametrize("levels", [H2, H3, ODD])
@pytest.mark.parametrize("num_heads,num_registers", [(4, 0), (3, 1)])  # 12 channels a head, all turned; 16, 4 not
def test_rope_features_equal_the_plain_formula(levels, num_heads, num_registers):
    trunk = released_trunk(levels, num_registers, num_heads=num_heads, rope=ROPE)
    sd = trunk.state_dict()
    study = torch.rand(2, 1, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = trunk(study[None])[0]
    naive = study_feature(sd, levels, (4, 8, 8), num_heads, study, head="dinotxt", rope_base=10000.0)
    torch.testing.assert_close(ours, naive, atol=1e-10, rtol=1e-8)
    # the rotation is not a no-op: the same weights without it give another feature
    assert (ours - study_feature(sd, levels, (4, 8, 8), num_heads, study, head="dinotxt")).abs().max() > 1e-4


def test_rope_adds_no_tensor_and_other_scan_sizes_use_their_own_grid():
    plain, rotary = released_trunk(H2), released_trunk(H2, rope=ROPE)
    assert plain.state_dict().keys() == rotary.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), rotary.state_dict().values()))
    study = torch.rand(2, 1, 24, 40, 32, dtype=torch.float64)  # a 6 x 5 x 4 patch grid, the table resampled
    with torch.no_grad():
        ours = rotary(study[None])[0]
    torch.testing.assert_close(ours, study_feature(rotary.state_dict(), H2, (4, 8, 8), 4, study, head="dinotxt",
                                                   rope_base=10000.0), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("rope", [{"base": 1.0}, {"theta": 10000.0}, "rope"])
def test_bad_rope_settings_are_named(rope):
    with pytest.raises(ValueError, match="vision.rope"):
        released_trunk(H2, rope=rope)
    with pytest.raises(ValueError, match="at least 6 channels per attention head"):
        build_trunk(dict(img_size=[16, 32, 32], patch_size=[4, 8, 8], width=48, depth=1, num_heads=12, levels=["scan"],
                         rope=ROPE))


def test_patch_dropout_keeps_each_kept_token_with_its_own_position():
    trunk = released_trunk(H3, rope=ROPE).float()
    x = torch.rand(2, 2, 1, 16, 32, 32)
    full, _ = trunk.embed(x)  # eval: every token, positions in grid order
    trunk.patch_dropout = 0.5
    trunk.train()
    kept, lay = trunk.embed(x)
    assert kept.shape[2] == 8 and lay.positions.shape == kept.shape[:3]
    assert not torch.equal(lay.positions, lay.positions.sort(dim=-1).values)  # a random subset, not a prefix
    flat = full.reshape(full.shape[0], -1, full.shape[-1])
    torch.testing.assert_close(kept, torch.stack([flat[v, lay.positions[v]] for v in range(flat.shape[0])]))
    out = trunk(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and trunk.cls_token.grad.abs().sum() > 0


def test_token_head_with_registers_is_the_cls_of_the_plain_formula():
    trunk = released_trunk(H2, num_registers=2, head="token")
    study = torch.rand(2, 1, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        ours = trunk(study[None])[0]
    torch.testing.assert_close(ours, study_feature(trunk.state_dict(), H2, (4, 8, 8), 4, study), atol=1e-10, rtol=1e-8)


def test_without_the_scan_table_scan_order_does_not_matter():
    trunk = released_trunk(H2, num_registers=1, scan_posemb=False)
    study = torch.rand(1, 3, 1, 16, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        a, b = trunk(study), trunk(study[:, [2, 0, 1]])
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    with_table = released_trunk(H2, num_registers=1, scan_posemb=True)
    with torch.no_grad():
        assert (with_table(study) - with_table(study[:, [2, 0, 1]])).abs().max() > 1e-4


@pytest.mark.parametrize("levels,rope", [(H2, None), (H3, None), (ODD, None), (H2, ROPE), (ODD, ROPE)])
def test_padded_batch_equals_each_study_alone(levels, rope):
    trunk = released_trunk(levels, num_registers=1, rope=rope)
    x = torch.rand(3, 3, 1, 16, 32, 32, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    with torch.no_grad():
        batched = trunk(x, mask)
        for i in range(3):
            alone = trunk(x[i : i + 1, : int(mask[i].sum())])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-10, rtol=1e-8)


def test_patch_dropout_keeps_every_prefix_token_and_trains():
    trunk = released_trunk(H3, num_registers=1).float()
    trunk.patch_dropout = 0.5
    trunk.train()
    x = torch.rand(2, 2, 1, 16, 32, 32)
    tokens, lay = trunk.embed(x)
    assert tokens.shape[2] == 8  # 16 tokens a slab, half kept
    state = trunk.forward_until_last(x)
    K = trunk.num_prefix_tokens
    assert state.seq.shape[1] == K + tokens.shape[2] * (lay.slabs if state.level == "study" else 1) * (
        lay.slots if state.level == "study" else 1)
    out = trunk(x)
    assert out.shape == (2, 2, 96) and torch.isfinite(out).all()
    out.sum().backward()
    assert trunk.reg_token.grad.abs().sum() > 0 and trunk.cls_token.grad.abs().sum() > 0


@pytest.mark.parametrize("rope", [None, ROPE])
def test_gradient_checkpointing_gives_the_same_gradients_with_registers(rope):
    grads = []
    for ckpt in (False, True):
        trunk = released_trunk(H3, num_registers=1, rope=rope).float().train()
        trunk.set_grad_checkpointing(ckpt)
        x = torch.rand(2, 2, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))
        trunk(x, torch.tensor([[True, True], [True, False]])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in trunk.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_dual_model_tokens_heads_and_temperatures():
    torch.manual_seed(0)
    model = hlip_core.create_model("tiny_multiscan_h2_dualdinotxt").eval()
    sd = model.state_dict()
    assert sd["visual.head.proj.weight"].shape == (64, 2 * 96)
    assert sd["visual.trunk.reg_token"].shape == (1, 1, 96) and "visual.trunk.sequential_posemb" not in sd
    assert not any("fc_norm" in k for k in sd) and sd["visual.trunk.norm.weight"].shape == (96,)
    assert model.report_logit_scale is not None
    x = torch.rand(2, 2, 1, 32, 64, 64)
    with torch.no_grad():
        z = model.encode_study_tokens(x)
        feats = model.visual.trunk(x)
    assert z.shape == (2, 2, 64)
    torch.testing.assert_close(z, F.normalize(feats @ sd["visual.head.proj.weight"].T, dim=-1))
    with torch.no_grad():
        torch.testing.assert_close(model.encode_study(x), z[:, 0])
        torch.testing.assert_close(model.encode_study_for_reports(x), z[:, 1])


def perturbed_model(name):
    """A small model of configuration ``name`` (eval mode) with every learned visual weight moved off
    its initialisation, so heat maps have structure."""
    torch.manual_seed(0)
    model = hlip_core.create_model(name).eval()
    with torch.no_grad():
        for p in model.visual.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_heat_maps_for_both_tokens_have_the_right_shapes_and_differ():
    model = perturbed_model("tiny_multiscan_h2_dualdinotxt")
    x, mask = torch.rand(1, 3, 1, 32, 64, 64), torch.tensor([[True, True, False]])
    directions = torch.randn(3, 64)
    first, share0, z0, _ = relevance_maps(model, x, mask, directions, return_embedding=True)
    last, share1, z1, _ = relevance_maps(model, x, mask, directions, return_embedding=True, token=-1)
    assert first.shape == last.shape == (3, 2, 32, 64, 64)
    assert share0.shape == share1.shape == (3, 2)
    with torch.no_grad():
        torch.testing.assert_close(z0, model.encode_study(x, mask)[0])
        torch.testing.assert_close(z1, model.encode_study_for_reports(x, mask)[0])
    assert (first - last).abs().max() > 1e-2
    assert torch.isfinite(first).all() and float(first.flatten(1).max(dim=1).values.min()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        relevance_maps(model, x, mask, directions, token=2)


def test_heat_maps_of_a_rope_model_score_its_own_embedding():
    """relevance_maps re-runs the last block alone: it must turn queries and keys there too, or the
    embedding it scores would not be the model's."""
    model = perturbed_model("tiny_rope_multiscan_h2_dinotxt")
    x, mask = torch.rand(1, 3, 1, 32, 64, 64), torch.tensor([[True, True, False]])
    maps, share, z, state = relevance_maps(model, x, mask, torch.randn(3, 64), return_embedding=True)
    assert maps.shape == (3, 2, 32, 64, 64) and share.shape == (3, 2) and state.rope is not None
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode_study(x, mask)[0])
    assert torch.isfinite(maps).all() and float(maps.flatten(1).max(dim=1).values.min()) == pytest.approx(1.0)
    again, _ = relevance_maps(model, None, None, torch.randn(3, 64), state=state)  # from the kept state
    assert again.shape == maps.shape


def test_dinotxt_heat_map_adds_the_patch_mean_term():
    """A direction the cls attention cannot reach (the last block's attention output zeroed, so its
    gradient is zero) still has a map: the patch-mean term, relu(g . t_j) / n."""
    torch.manual_seed(0)
    model = hlip_core.create_model("tiny_multiscan_h2_dinotxt").eval()
    with torch.no_grad():
        model.visual.trunk.blocks[-1].attn.proj.weight.zero_()
    x = torch.rand(1, 2, 1, 32, 64, 64)
    maps, _ = relevance_maps(model, x, None, torch.randn(2, 64))
    assert maps.shape == (2, 2, 32, 64, 64) and float(maps.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("name,width,depth,registers,table,loss,params", [
    ("vit_base_multiscan_h2_dinotxt1176", 768, 12, 0, True, "clip", 86.0),
    ("vit_base_multiscan_h2_dinotxt1568", 768, 12, 0, True, "clip", 86.0),
    ("ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568", 768, 12, 0, False, "clip", 86.0),
    ("ablate_seqposemb_vit_base_multiscan_h2_dualdinotxt1568", 768, 12, 1, False, "dual", 86.0),
    ("ablate_seqposemb_vit_large_multiscan_h2_dualdinotxt1568", 1024, 24, 1, False, "dual", 303.0),
    ("ablate_rope_vit_base_multiscan_h2_dinotxt1568", 768, 12, 0, False, "clip", 86.0),
])
def test_full_size_configurations_build_with_the_released_shapes(name, width, depth, registers, table, loss, params):
    cfg = get_config(name)
    assert cfg["name"] == name and cfg["embed_dim"] == 768 and cfg["loss"] == loss
    assert cfg["text"]["context_length"] == 256 and cfg["text"]["hidden"] == 768 and cfg["text"]["layers"] == 12
    v = cfg["vision"]
    assert v["img_size"] == [48, 224, 224] and v["drop_path"] == 0.2
    assert v["patch_size"] == ([8, 16, 16] if name.endswith("1176") else [6, 16, 16])
    study_blocks = [5, 11, 17, 23] if depth == 24 else [2, 5, 8, 11]
    assert v["levels"] == ["study" if i in study_blocks else "scan" for i in range(depth)]
    with torch.device("meta"):  # shapes and counts only: no memory, no initialisation work
        trunk = build_trunk(v)
    sd = trunk.state_dict()
    assert trunk.num_features == 2 * width and ("sequential_posemb" in sd) == table
    assert ("reg_token" in sd) == bool(registers) and not any("fc_norm" in k for k in sd)
    assert sd["spatial_posemb"].shape == (1, 48 // v["patch_size"][0], 14, 14, width)
    learned = sum(p.numel() for p in trunk.parameters() if p.requires_grad) / 1e6
    assert learned == pytest.approx(params, rel=0.01)  # timm's ViT-B/16 86M, ViT-L/16 303M


def test_the_full_size_rope_model_has_the_released_keys():
    """The released ablate_rope module computes its rotary angles on the fly (no parameter, no
    buffer): its state dict has the keys and shapes of the same ViT-B without rope."""
    with torch.device("meta"):
        rope = hlip_core.HLIPModel(get_config("ablate_rope_vit_base_multiscan_h2_dinotxt1568"))
        plain = hlip_core.HLIPModel(get_config("ablate_seqposemb_vit_base_multiscan_h2_dinotxt1568"))
    sd, ref = rope.state_dict(), plain.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert rope.visual.trunk.rope == {"base": 10000.0} and plain.visual.trunk.rope is None
    for key in ("visual.trunk.spatial_posemb", "visual.trunk.blocks.11.attn.qkv.weight", "visual.head.proj.weight"):
        assert key in sd
    assert not any("rope" in k or "freq" in k for k in sd)


def test_rope_under_bf16_autocast_is_close_to_fp32():
    """Under CPU bf16 autocast the angles and the turn are computed in float32 (only the linear
    layers run in bf16), so the feature stays close to the fp32 one."""
    trunk = released_trunk(ODD, rope=ROPE).float()
    x = torch.rand(2, 2, 1, 16, 32, 32)
    with torch.no_grad():
        ref = trunk(x)
        with hlip_core.model.autocast("cpu", "bf16"):
            low = trunk(x)
    assert low.dtype == torch.bfloat16
    assert (F.cosine_similarity(ref, low.float(), dim=-1) > 0.99).all()
