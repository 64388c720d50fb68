"""train/pretrain.py as a user runs it, in separate processes: two gloo processes under torchrun
train exactly like one process on the same global batch, and a run killed with SIGKILL and resumed
with --resume auto ends with the same weights as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_train_support import PRETRAIN, REPO, pretrain, run_options, write_manifest, write_prompts


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def checkpoint_state(run, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())


def torchrun(nproc: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(PRETRAIN), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_two_gloo_processes_train_like_one_process_on_the_same_global_batch(tmp_path):
    data = write_manifest(tmp_path / "prep", studies=12, scans=(1, 3))
    held = write_manifest(tmp_path / "held", studies=6, scans=(1, 2), seed=4)
    prompts = write_prompts(tmp_path / "prompts.json")
    # single-scan configuration: nothing random inside the model, so both runs compute one function
    common = dict(config="tiny_singlescan_h2", max_scans=1, steps=1, progress=False, tensorboard=False, checkpoint_every=1,
                  eval_data=held, eval_prompts=prompts, eval_every=1)
    one = pretrain(run_options(data, tmp_path / "one", batch_size=4, accum_steps=1, **common))
    assert one.returncode == 0, one.stderr[-3000:]
    # 2 processes x 2 micro-batches x 1 study: the same 4 studies, gathered across processes and cached across micro-batches
    two = torchrun(2, run_options(data, tmp_path / "two", batch_size=1, accum_steps=2, **common))
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]

    a, b = checkpoint_state(tmp_path / "one", 1), checkpoint_state(tmp_path / "two", 1)
    assert a["sampler"]["global_batch"] == b["sampler"]["global_batch"] == 4 and b["world"] == 2
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert len(b["rng"]) == 2  # every process's random state is in the checkpoint
    assert b["history"][0]["studies"] == a["history"][0]["studies"] == 6  # the evaluation was shared out and gathered
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert wa.keys() == wb.keys()
    # AdamW's first step moves each weight by about lr * g / (|g| + eps) = +-1e-3; where |g| is near eps it
    # amplifies rounding differences, so a few weights may differ by a few percent of one step, no more
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=5e-5, msg=f"weights of {name} after one step")
    mean_difference = sum(float((wa[k] - wb[k]).abs().sum()) for k in wa) / sum(v.numel() for v in wa.values())
    assert mean_difference < 1e-6


def test_a_run_killed_mid_way_and_resumed_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    data = write_manifest(tmp_path / "prep", studies=16, scans=(1, 3))
    # a locked sentence-pooled text tower: its sentences are cached, and the cache starts empty again
    # after the resume, so the resumed run encodes them in other batches than the straight one did
    common = dict(steps=14, batch_size=4, accum_steps=2, checkpoint_every=2, keep_checkpoints=2, progress=False, resume="auto",
                  text_pooling="sentence", lock_text=True, text_feature_norm="standardise", model_overrides={"vision": {"patch_dropout": 0.25}})
    straight = pretrain(run_options(data, tmp_path / "straight", workers=1, **common))
    assert straight.returncode == 0, straight.stderr[-3000:]

    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(PRETRAIN), *run_options(data, run, workers=1, **common)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "step_00000004").is_dir():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before the kill; it was not interrupted"
    # resume in-line, with no loader worker: the data order must not depend on it
    resumed = pretrain(run_options(data, run, workers=0, **common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resuming from" in log
    a, b = weights(tmp_path / "straight"), weights(run)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after the resume"
    assert checkpoint_state(run, 14)["loss"] == checkpoint_state(tmp_path / "straight", 14)["loss"]
