"""Tiny prepared archives for the training tests, written directly as manifest.py describes them.

``write_manifest`` makes studies of 1-3 scans of small random uint8 arrays with short reports that
name a planted finding (or deny it), so that training, checkpoints and distributed runs can be
exercised in seconds. ``run_options`` is a tiny training run's option list for train/pretrain.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from hlip_core.data.manifest import read_manifest, read_settings

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "train" / "pretrain.py"
POSITIVE = ["There is a bright lesion.", "A bright focal lesion is seen.", "Bright lesion present."]
NEGATIVE = ["No lesion.", "No bright lesion is seen.", "The study is normal."]
FILLER = ["The ventricles are normal.", "No midline shift.", "The orbits are unremarkable."]


def write_manifest(folder: Path, studies: int = 12, scans: tuple[int, int] = (1, 3), shape=(32, 64, 64), seed: int = 0,
                   dtype: str = "uint8") -> Path:
    """A prepared folder (manifest.jsonl, preprocess.json, arrays/) of ``studies`` random studies."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "arrays").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(studies):
        sid = f"s{i:03d}"
        lesion = int(rng.random() < 0.5)
        records = []
        for k in range(int(rng.integers(scans[0], scans[1] + 1))):
            array = (rng.random(shape) * 0.3 * 255).astype(np.uint8)
            if lesion and k == 0:
                array[8:16, 16:32, 16:32] = 255
            rel = f"arrays/{sid}/scan{k}.npy"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(folder / rel, array if dtype == "uint8" else (array / 255.0).astype(np.float16))
            records.append({"scan_id": f"scan{k}", "path": rel, "shape": list(shape), "dtype": dtype,
                            "modality": "MR", "description": f"series {k}"})
        sentences = [str(rng.choice(POSITIVE if lesion else NEGATIVE)), str(rng.choice(FILLER))]
        lines.append({"study_id": sid, "scans": records, "report": " ".join(sentences), "sentences": sentences,
                      "labels": {"lesion": lesion}})
    with open(folder / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    (folder / "preprocess.json").write_text(json.dumps({"target_shape": list(shape)}))
    return folder


def write_prompts(path: Path) -> Path:
    path.write_text(json.dumps({"name": "lesion", "mode": "binary", "templates": ["{}"],
                                "findings": [{"name": "lesion", "column": "lesion", "positive": "There is a bright lesion.",
                                              "negative": "No lesion."}]}))
    return path


def run_options(data: Path, out: Path, **options) -> list[str]:
    """Command-line options of a tiny CPU run (override any with keyword arguments)."""
    base = {"data": data, "out": out, "config": "tiny_multiscan_h2", "steps": 4, "batch_size": 4, "max_scans": 3,
            "vocab_size": 200, "lr": 1e-3, "warmup_steps": 1, "workers": 0, "checkpoint_every": 100, "device": "cpu"}
    base.update(options)
    argv = []
    for key, value in base.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [flag, value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict) else str(value)]
    return argv


def pretrain(args: list[str], timeout: float = 300, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run train/pretrain.py in a new process; raises with its output when it fails."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(PRETRAIN), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=REPO, **kwargs)


def test_written_manifest_reads_back_as_the_contract_says(tmp_path):
    folder = write_manifest(tmp_path / "prep", studies=5, scans=(2, 2), seed=3)
    records = read_manifest(folder)
    assert [r["study_id"] for r in records] == ["s000", "s001", "s002", "s003", "s004"]
    assert all(len(r["scans"]) == 2 and r["sentences"] for r in records)
    assert read_settings(folder) == {"target_shape": [32, 64, 64]}
