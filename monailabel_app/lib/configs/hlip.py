"""Settings of the HLIP server, read once from MONAI Label's ``--conf key value`` pairs."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_FINDINGS = [
    "intracranial hemorrhage",
    "acute infarct",
    "mass effect",
    "midline shift",
    "hydrocephalus",
    "brain tumor",
    "white matter lesions",
    "brain atrophy",
]


def _bool(value: str | bool, key: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--conf {key} must be true or false, got {value!r}")


def _int(value, key: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} must be a whole number, got {value!r}") from None
    if not lo <= n <= hi:
        raise ValueError(f"--conf {key} must be between {lo} and {hi}, got {n}")
    return n


@dataclass
class HLIPConfig:
    """Everything the server needs to know; ``from_conf`` validates the strings given on the command line."""

    checkpoint: Path
    cache_dir: Path
    device: str = "cpu"
    precision: str = "fp32"
    findings: list[str] = field(default_factory=lambda: list(DEFAULT_FINDINGS))
    heatmaps: bool = True  # heat maps may be asked for (a server can switch them off)
    max_upload_mb: int = 512
    max_queue: int = 16  # interactive requests waiting for the model; past it: 503
    max_findings: int = 32  # per request (each finding costs one backward pass for its heat map)
    threads: int = 1  # torch intra-op threads of the inference worker
    index: bool = True  # keep the datastore's embedding cache filled in the background
    rescan_seconds: float = 30.0  # how often the datastore is checked for new or changed studies
    prepared_cache: int = 4  # studies kept loaded and preprocessed in memory

    @classmethod
    def from_conf(cls, conf: dict, studies: str) -> "HLIPConfig":
        known = {"checkpoint", "cache_dir", "device", "precision", "findings", "heatmaps", "max_upload_mb", "max_queue",
                 "max_findings", "threads", "index", "rescan_seconds", "prepared_cache", "server_mode"}
        unknown = sorted(set(conf) - known)
        if unknown:
            raise ValueError(f"unknown --conf key(s) {', '.join(unknown)}; known: {', '.join(sorted(known - {'server_mode'}))}")
        if not conf.get("checkpoint"):
            raise ValueError("--conf checkpoint <folder> is required (a checkpoint folder written by hlip_core.save)")
        checkpoint = Path(conf["checkpoint"]).expanduser().resolve()
        if not checkpoint.is_dir():
            raise ValueError(f"--conf checkpoint {checkpoint}: no such checkpoint folder")
        cache = conf.get("cache_dir")
        if cache:
            cache_dir = Path(cache).expanduser().resolve()
        else:  # one cache per datastore, beside MONAI Label's own ~/.cache/monailabel
            tag = hashlib.sha256(studies.encode()).hexdigest()[:12]
            cache_dir = Path.home() / ".cache" / "hlip" / "server" / tag
        findings = [f.strip() for f in conf.get("findings", "").split(";") if f.strip()] or list(DEFAULT_FINDINGS)
        cfg = cls(
            checkpoint=checkpoint,
            cache_dir=cache_dir,
            device=conf.get("device", "cpu"),
            precision=conf.get("precision", "fp32"),
            findings=findings,
            heatmaps=_bool(conf.get("heatmaps", True), "heatmaps"),
            max_upload_mb=_int(conf.get("max_upload_mb", 512), "max_upload_mb", 1, 1 << 20),
            max_queue=_int(conf.get("max_queue", 16), "max_queue", 1, 10000),
            max_findings=_int(conf.get("max_findings", 32), "max_findings", 1, 1000),
            threads=_int(conf.get("threads", max(1, min(8, (os.cpu_count() or 2) // 2))), "threads", 1, 256),
            index=_bool(conf.get("index", True), "index"),
            rescan_seconds=float(conf.get("rescan_seconds", 30.0)),
            prepared_cache=_int(conf.get("prepared_cache", 4), "prepared_cache", 0, 1000),
        )
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"--conf precision must be fp32 or bf16, got {cfg.precision!r}")
        return cfg

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024
