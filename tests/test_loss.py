"""CLIP, SigLIP and dual (sentence + report) losses against their direct formulas, alone and split over 2 gloo processes."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from hlip_core.loss import LOSSES, ClipLoss, DualClipLoss, SigLipLoss, make_loss
from hlip_core.training.config import LOSSES as TRAINING_LOSSES


def direct_clip(img, txt, scale):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def direct_siglip(img, txt, scale, bias):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(img[i] @ txt[j]) + bias
            y = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-y * z))
    return total / n


def features(n=6, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=-1), F.normalize(torch.randn(n, e, generator=g), dim=-1)


def test_clip_loss_equals_the_formula():
    img, txt = features()
    got = ClipLoss()(img, txt, torch.tensor(10.0))
    assert abs(float(got) - direct_clip(img, txt, 10.0)) < 1e-5


def test_siglip_loss_equals_the_formula():
    img, txt = features()
    got = SigLipLoss()(img, txt, torch.tensor(10.0), torch.tensor(-3.0))
    assert abs(float(got) - direct_siglip(img, txt, 10.0, -3.0)) < 1e-4


def test_dual_loss_is_the_mean_of_a_sentence_term_on_token_0_and_a_report_term_on_the_last_token():
    img0, sent = features(seed=1)
    img1, rep = features(seed=2)
    tokens = torch.stack([img0, F.normalize(torch.randn(6, 8), dim=-1), img1], dim=1)  # T = 3: the middle token is unused
    got = DualClipLoss()(tokens, sent, rep, torch.tensor(10.0), torch.tensor(4.0))
    expected = 0.5 * direct_clip(img0, sent, 10.0) + 0.5 * direct_clip(img1, rep, 4.0)
    assert abs(float(got) - expected) < 1e-5
    # a single-token model (T = 1) uses its one token in both terms
    got = DualClipLoss()(img0[:, None], sent, rep, torch.tensor(10.0), torch.tensor(4.0))
    assert abs(float(got) - (0.5 * direct_clip(img0, sent, 10.0) + 0.5 * direct_clip(img0, rep, 4.0))) < 1e-5


def test_dual_loss_refuses_pooled_features_and_a_missing_report_temperature():
    img, txt = features()
    with pytest.raises(ValueError, match=r"study tokens \[b, T, E\]"):
        DualClipLoss()(img, txt, txt, torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="report temperature"):
        DualClipLoss()(img[:, None], txt, txt, torch.tensor(1.0), None)


def test_loss_kind_is_checked():
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("triplet")
    assert TRAINING_LOSSES == LOSSES  # --loss offers exactly the losses make_loss builds
    assert all(make_loss(kind) is not None for kind in LOSSES)
    with pytest.raises(ValueError, match="logit bias"):
        SigLipLoss()(*features(), torch.tensor(1.0), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoTowers(torch.nn.Module):
    """A stand-in for the image and text towers: what matters is how the loss spreads gradients."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(10, 8)
        self.txt = torch.nn.Linear(12, 8)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))
        self.bias = torch.nn.Parameter(torch.tensor(-1.0)) if kind == "siglip" else None
        self.kind = kind
        if kind == "dual":  # two image tokens, the report through its own layer, its own temperature
            self.img = torch.nn.Linear(10, 16)
            self.rep = torch.nn.Linear(12, 8)
            self.report_scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, a, b):
        if self.kind == "dual":
            tokens = F.normalize(self.img(a).view(a.shape[0], 2, 8), dim=-1)
            return (tokens, F.normalize(self.txt(b), dim=-1), F.normalize(self.rep(b), dim=-1), self.scale.exp(),
                    self.report_scale.exp())
        return F.normalize(self.img(a), dim=-1), F.normalize(self.txt(b), dim=-1), self.scale.exp(), self.bias


def _step(model, loss_fn, a, b):
    loss = loss_fn(*model(a, b))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, world, port, kind, a, b, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TwoTowers(kind))
        per = a.shape[0] // world
        sl = slice(rank * per, (rank + 1) * per)
        loss, grads = _step(model, make_loss(kind), a[sl], b[sl])
        dist.all_reduce(loss)
        out[rank] = (float(loss) / world, {k.removeprefix("module."): v for k, v in grads.items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["clip", "siglip", "dual"])
def test_distributed_loss_and_gradients_equal_one_process(kind):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 10, generator=g), torch.randn(8, 12, generator=g)
    one_loss, one_grads = _step(TwoTowers(kind), make_loss(kind), a, b)
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), kind, a, b, out), nprocs=2, join=True)
    for rank in range(2):
        loss, grads = out[rank]
        assert abs(loss - float(one_loss)) < 1e-5
        for k, v in one_grads.items():
            torch.testing.assert_close(grads[k], v, atol=1e-6, rtol=1e-4, msg=f"gradient of {k} on rank {rank}")
