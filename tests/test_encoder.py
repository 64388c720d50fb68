"""The hierarchical encoder: shapes, level schedule, masks, position embeddings, input errors."""
import pytest
import torch

import hlip_core
from hlip_core.model.clip import build_trunk
from hlip_core.model.registry import get_config

from naive_reference import study_feature


def small_trunk(levels, max_scans=40, width=48, heads=4, img=(16, 32, 32), patch=(4, 8, 8), seed=0):
    torch.manual_seed(seed)
    vision = dict(img_size=list(img), patch_size=list(patch), width=width, depth=len(levels), num_heads=heads,
                  mlp_ratio=2.0, max_scans=max_scans, levels=list(levels))
    trunk = build_trunk(vision).eval()
    with torch.no_grad():  # non-trivial cls and biases so that wrong averaging would show
        trunk.cls_token.normal_()
        for name, p in trunk.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return trunk


H2 = ["scan", "scan", "study", "scan", "scan", "study"]
H3 = ["slice", "scan", "study", "slice", "scan", "study"]
ODD = ["study", "slice", "slice", "scan", "study", "slice"]  # every transition, ending below study


@pytest.mark.parametrize("name", [n for n in hlip_core.list_configs()])
def test_every_configuration_builds_and_embeds(name):
    cfg = get_config(name)
    trunk = build_trunk(cfg["vision"]).eval()
    d, h, w = cfg["vision"]["patch_size"]
    n = 1 if cfg["vision"]["max_scans"] == 1 else 2
    x = torch.randn(2, n, 1, 2 * d, 2 * h, 2 * w)  # small scans: the position table is resampled
    with torch.no_grad():
        out = trunk(x)
    if cfg["vision"].get("head", "token") == "dinotxt":
        assert out.shape == (2, 1 + cfg["vision"].get("num_registers", 0), 2 * cfg["vision"]["width"])
    else:
        assert out.shape == (2, cfg["vision"]["width"])
    assert torch.isfinite(out).all()
    if name.endswith("_fullattn"):
        assert set(trunk.levels) == {"study"}
    assert len(trunk.blocks) == cfg["vision"]["depth"]


def test_published_schedules():
    assert get_config("vit_base_multiscan_h3_token1176")["vision"]["levels"] == ["slice", "scan", "study"] * 4
    assert get_config("vit_base_multiscan_h2_token1176")["vision"]["levels"] == ["scan", "scan", "study"] * 4
    assert get_config("vit_base_singlescan_h2_token2744")["vision"]["levels"] == ["slice", "slice", "study"] * 4
    c = get_config("vit_base_multiscan_h2_token588")["vision"]
    assert (c["img_size"], c["patch_size"], c["width"], c["depth"], c["num_heads"]) == ([48, 224, 224], [16, 16, 16], 768, 12, 12)


@pytest.mark.parametrize("levels", [H2, H3, ODD, ["study"] * 4, ["scan"] * 3, ["slice"] * 3])
def test_matches_plain_per_partition_attention(levels):
    trunk = small_trunk(levels)
    sd = trunk.state_dict()
    study = torch.randn(3, 1, 16, 32, 32)
    with torch.no_grad():
        ours = trunk(study[None])[0]
        naive = study_feature(sd, levels, (4, 8, 8), 4, study)
    torch.testing.assert_close(ours, naive, atol=2e-5, rtol=1e-4)


def test_all_study_blocks_equal_full_attention_over_all_tokens():
    trunk = small_trunk(["study"] * 3)
    x = torch.randn(1, 3, 1, 16, 32, 32)
    with torch.no_grad():
        prefix, patches, _ = trunk.forward_tokens(x)
        cls = prefix[:, 0]
        # plain ViT: one sequence of cls + every token of every scan, through the same blocks
        tokens, _ = trunk.embed(x)
        seq = torch.cat([trunk.cls_token, tokens.reshape(1, -1, trunk.width)], dim=1)
        for blk in trunk.blocks:
            seq = blk(seq)
        plain = trunk.norm(seq)
    torch.testing.assert_close(cls, plain[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches.reshape(1, -1, trunk.width), plain[:, 1:], atol=1e-5, rtol=1e-5)


def test_scan_level_model_treats_each_scan_alone():
    trunk = small_trunk(["scan"] * 4)
    x = torch.randn(1, 3, 1, 16, 32, 32)
    with torch.no_grad():
        _, patches, _ = trunk.forward_tokens(x)
        for k in range(3):
            only_k = torch.zeros(1, 3, dtype=torch.bool)
            only_k[0, k] = True
            _, alone, _ = trunk.forward_tokens(x, only_k)
            torch.testing.assert_close(alone[0], patches[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("levels", [H2, H3, ODD])
def test_study_embedding_does_not_change_when_padded_in_a_batch(levels):
    trunk = small_trunk(levels)
    small = torch.randn(1, 2, 1, 16, 32, 32)
    big = torch.randn(1, 5, 1, 16, 32, 32)
    batch = torch.zeros(3, 5, 1, 16, 32, 32)
    batch[0, :2] = small[0]
    batch[0, 2:] = 7.0  # garbage in padded slots must not leak in
    batch[1] = big[0]
    batch[2, :1] = small[0, :1]
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        together = trunk(batch, mask)
        alone = [trunk(small), trunk(big), trunk(small[:, :1])]
    for i in range(3):
        torch.testing.assert_close(together[i], alone[i][0], atol=1e-5, rtol=0)


def test_scan_index_embedding_follows_module_training_not_batch_size():
    trunk = small_trunk(H2)
    x = torch.randn(1, 3, 1, 16, 32, 32)
    with torch.no_grad():
        one = trunk(x)
        two = trunk(x.expand(2, -1, -1, -1, -1, -1))
        torch.testing.assert_close(two[0], one[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(two[1], one[0], atol=1e-5, rtol=0)
        trunk.train()
        torch.manual_seed(1)
        a = trunk(x)
        torch.manual_seed(2)
        b = trunk(x)
    assert not torch.allclose(a, b), "training must draw random scan-index rows"
    assert not torch.allclose(a, one)


def test_scan_index_rows_in_evaluation_are_the_first_rows_and_interpolate_past_the_table():
    from hlip_core.model.pos_embed import scan_index_rows

    table = torch.randn(1, 4, 6)
    torch.testing.assert_close(scan_index_rows(table, 3, training=False), table[0, :3])
    seven = scan_index_rows(table, 7, training=False)
    assert seven.shape == (7, 6)
    trunk = small_trunk(H2, max_scans=4)
    with torch.no_grad():
        assert trunk(torch.randn(1, 6, 1, 16, 32, 32)).shape == (1, 48)  # more scans than rows: fine in eval
    trunk.train()
    with pytest.raises(ValueError, match="at most 4"):
        trunk(torch.randn(1, 6, 1, 16, 32, 32))


def test_other_scan_sizes_resample_the_position_table():
    trunk = small_trunk(H2)
    with torch.no_grad():
        out = trunk(torch.randn(1, 2, 1, 24, 48, 40))  # not the (16, 32, 32) it was built for
    assert out.shape == (1, 48) and torch.isfinite(out).all()


def test_patch_dropout_keeps_partitions_equal_and_trains():
    for levels in (H2, H3):
        trunk = small_trunk(levels)
        trunk.patch_dropout = 0.5
        trunk.train()
        tokens, lay = trunk.embed(torch.randn(2, 3, 1, 16, 32, 32))
        full_t = 16 if "slice" in levels else 64  # tokens per slab (4x4) or per scan (4x4x4)
        assert tokens.shape[2] == full_t // 2
        out = trunk(torch.randn(2, 3, 1, 16, 32, 32), torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool))
        out.sum().backward()
        assert trunk.patch_embed.proj.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 2, 1, 16, 32, 32)
    grads = []
    for ckpt in (False, True):
        trunk = small_trunk(H3)
        trunk.train()
        trunk.set_grad_checkpointing(ckpt)
        torch.manual_seed(0)
        trunk(x).square().sum().backward()
        grads.append(trunk.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_patch_embedding_is_the_strided_convolution_of_the_standardised_scan():
    trunk = small_trunk(H2)
    trunk.input_mean, trunk.input_std = 0.4, 0.2
    x = torch.rand(3, 1, 16, 32, 32)
    conv = trunk.patch_embed.proj((x - 0.4) / 0.2).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(trunk.patch_embed(x, 0.4, 0.2), conv, atol=1e-5, rtol=1e-5)
    # and its weight gradient is the convolution's (float64: the algebra, not the summation order)
    embed, x = trunk.patch_embed.double(), x.double()
    grads = []
    for run in (lambda: embed(x, 0.4, 0.2), lambda: embed.proj((x - 0.4) / 0.2).permute(0, 2, 3, 4, 1)):
        embed.zero_grad()
        (run() * torch.linspace(-1, 1, 48, dtype=torch.float64)).square().sum().backward()
        grads.append(embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


def test_uint8_scans_embed_as_their_float_intensities():
    trunk = small_trunk(H2)
    raw = torch.randint(0, 256, (2, 2, 1, 16, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(trunk(raw), trunk(raw.float() / 255.0), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_is_close_to_fp32():
    trunk = small_trunk(H2)
    x = torch.randn(2, 2, 1, 16, 32, 32)
    with torch.no_grad():
        ref = trunk(x)
        with hlip_core.model.autocast("cpu", "bf16"):
            low = trunk(x)
    assert low.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(ref, low.float(), dim=-1)
    assert (cos > 0.99).all(), cos


def test_native_bf16_detection_agrees_with_the_cpu_flags():
    """The demo trains in bf16 only where the CPU has bf16 matrix hardware; Linux lists it in cpuinfo."""
    from pathlib import Path
    from hlip_core.demo import DEMO_TRAINING

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with (not Linux)")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})
    assert hlip_core.model.cpu_has_native_bf16() == native, sorted(f for f in flags if "bf16" in f or "amx" in f)
    assert DEMO_TRAINING["precision"] == ("bf16" if native else "fp32")


@pytest.mark.parametrize(
    "x, mask, message",
    [
        (torch.randn(2, 1, 16, 32, 32), None, "rank 5"),
        (torch.randn(1, 2, 1, 15, 32, 32), None, "D=15 is not divisible"),
        (torch.randn(1, 2, 2, 16, 32, 32), None, "channel"),
        (torch.randn(2, 2, 1, 16, 32, 32), torch.tensor([[1, 0], [0, 0]], dtype=torch.bool), r"no valid scan for study index\(es\) \[1\]"),
        (torch.randn(2, 2, 1, 16, 32, 32), torch.ones(2, 3, dtype=torch.bool), "scan_mask must be"),
    ],
)
def test_bad_input_is_named(x, mask, message):
    trunk = small_trunk(H2)
    with pytest.raises(ValueError, match=message):
        trunk(x, mask)


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        small_trunk(H2, img=(15, 32, 32))
    with pytest.raises(KeyError, match="unknown model configuration"):
        get_config("vit_huge")
    with pytest.raises(ValueError, match="blocks \\[1\\] have no attention level"):
        get_config("tiny_multiscan_h2", vision={"depth": 2, "levels": {"scan": [0]}})
    single = build_trunk(get_config("tiny_singlescan_h2")["vision"])
    with pytest.raises(ValueError, match="single-scan"):
        single(torch.randn(1, 2, 1, 32, 64, 64))


# -- the two-stage (mlp) patch embedding ---------------------------------------------------------

def _mlp_stem_reference(stem, x, mean, std):
    """The mlp stem written the long way: the sub-patch layer as a strided convolution, each patch's
    sub-patch features gathered in (depth, height, width) order, the means by average pooling."""
    z = (x.double() / (255.0 if x.dtype == torch.uint8 else 1.0) - mean) / std
    s = stem.sub_patch
    w = stem.sub.weight.double().reshape(-1, x.shape[1], *s)
    f = torch.nn.functional.conv3d(z, w, stem.sub.bias.double(), stride=s)  # [V, C1, D/s1, H/s2, W/s3]
    f = torch.nn.functional.gelu(f.movedim(1, -1))
    m = torch.nn.functional.avg_pool3d(z, s).movedim(1, -1)  # [V, D/s1, H/s2, W/s3, C]
    a, b, c = stem.counts
    V, D, H, W = x.shape[0], *(n // p for n, p in zip(x.shape[2:], stem.patch_size))
    out = torch.zeros(V, D, H, W, stem.proj.out_features, dtype=torch.float64)
    for i in range(D):
        for j in range(H):
            for k in range(W):
                block = f[:, i * a:(i + 1) * a, j * b:(j + 1) * b, k * c:(k + 1) * c]  # [V, a, b, c, C1]
                means = m[:, i * a:(i + 1) * a, j * b:(j + 1) * b, k * c:(k + 1) * c]
                out[:, i, j, k] = (block.reshape(V, -1) @ stem.proj.weight.double().T + stem.proj.bias.double()
                                   + means.reshape(V, -1) @ stem.means.weight.double().T)
    return out


@pytest.mark.parametrize("in_chans", [1, 2])
def test_mlp_stem_matches_the_long_way(in_chans):
    from hlip_core.model.encoder import MLPPatchEmbed3D
    torch.manual_seed(0)
    stem = MLPPatchEmbed3D((4, 8, 8), in_chans, 16, sub_patch=(2, 4, 2), channels=6)
    with torch.no_grad():
        for p in stem.parameters():
            p.normal_(std=0.3)
    x = torch.randint(0, 256, (3, in_chans, 8, 16, 24), dtype=torch.uint8)
    with torch.no_grad():
        ours = stem(x, 0.449, 0.226)
        floats = stem(x.float() / 255.0, 0.449, 0.226)
    assert ours.shape == (3, 2, 2, 3, 16)
    torch.testing.assert_close(ours.double(), _mlp_stem_reference(stem, x, 0.449, 0.226), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(floats, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("stem, words", [
    ({"kind": "mlp", "sub_patch": [3, 8, 8]}, "divide the patch size"),
    ({"kind": "mlp", "sub_patch": [2, 8]}, "3 sizes"),
    ({"kind": "mlp"}, "sub_patch (required)"),
    ({"kind": "mlp", "sub_patch": [2, 8, 8], "channels": 0}, "at least one channel"),
    ({"kind": "mlp", "sub_patch": [2, 8, 8], "width": 3}, "takes sub_patch"),
    ({"kind": "conv"}, "unknown stem kind 'conv'"),
    ({"kind": "linear", "channels": 3}, "takes no options"),
])
def test_bad_stem_configurations_are_named(stem, words):
    vision = dict(img_size=[16, 32, 32], patch_size=[8, 16, 16], width=32, depth=2, num_heads=4, levels=["scan", "study"],
                  stem=stem)
    with pytest.raises(ValueError) as err:
        build_trunk(vision)
    assert words in str(err.value)


def test_mlp_stem_model_round_trips_and_learns_through_both_paths(tmp_path):
    torch.manual_seed(0)
    model = hlip_core.create_model("tiny_multiscan_h2_mlpstem")
    stem = model.visual.trunk.patch_embed
    assert type(stem).__name__ == "MLPPatchEmbed3D"
    x = torch.randint(0, 256, (2, 2, 1, 32, 64, 64), dtype=torch.uint8)
    model.encode_study(x).square().sum().backward()
    for name in ("sub.weight", "sub.bias", "proj.weight", "means.weight"):
        assert stem.get_parameter(name).grad.abs().sum() > 0, name
    model.eval()
    loaded = hlip_core.load(hlip_core.save(model, tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_study(x), model.encode_study(x), atol=0, rtol=0)
