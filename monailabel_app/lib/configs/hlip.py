"""Settings of the HLIP server, read once from MONAI Label's ``--conf key value`` pairs."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hlip_core.data.limits import DEFAULT_MAX_VOXELS
from hlip_core.eval.retrieval import APPROXIMATE_FROM, NPROBE

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


# DICOM Modality codes of images a volume file may be (CT and MR are what the models are trained on;
# "CT" is normalised with a Hounsfield window, every other code by its own percentiles)
MODALITIES = ("CT", "MR", "PT", "NM", "US", "XA", "RF", "CR", "DX", "MG", "OT")


def modality_code(value, what: str) -> str:
    """``value`` as a DICOM modality code or "auto" (CT when the 1st percentile is below -500 HU)."""
    code = str(value).strip()
    if code.lower() == "auto":
        return "auto"
    if code.upper() not in MODALITIES:
        raise ValueError(f"{what} must be \"auto\" or a DICOM modality code ({', '.join(MODALITIES)}), got {str(value)[:40]!r}")
    return code.upper()


def _float(value, key: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"--conf {key} must be a number, got {value!r}") from None
    if not lo <= x <= hi:
        raise ValueError(f"--conf {key} must be between {lo:g} and {hi:g}, got {x:g}")
    return x


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
    approximate_from: int = APPROXIMATE_FROM  # cached studies from which search uses a FAISS index (else exact)
    nprobe: int = NPROBE  # inverted lists an approximate search reads
    rescan_seconds: float = 30.0  # how often the datastore is checked for new or changed studies
    prepared_cache: int = 4  # studies kept loaded and preprocessed in memory
    volume_modality: str = "auto"  # modality of NIfTI/NRRD/MHA volumes that do not say theirs ("auto": CT if it holds HU)
    max_voxels: int = DEFAULT_MAX_VOXELS  # per volume (and 4 bytes each of voxel data); see hlip_core.data.limits
    sessions_max_bytes: int = 4 << 30  # all upload sessions together on disk; past it the oldest expire
    probe: Path | None = None  # a linear probe of train/probe.py: its probabilities join the findings answer

    @classmethod
    def from_conf(cls, conf: dict, studies: str) -> "HLIPConfig":
        known = {"checkpoint", "cache_dir", "device", "precision", "findings", "heatmaps", "max_upload_mb", "max_queue",
                 "max_findings", "threads", "index", "approximate_from", "nprobe", "rescan_seconds", "prepared_cache", "volume_modality",
                 "server_mode", "cors_origins", "max_voxels", "sessions_max_bytes", "probe"}
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
        probe = None
        if conf.get("probe"):
            probe = Path(conf["probe"]).expanduser().resolve()
            if not probe.is_file():
                raise ValueError(f"--conf probe {probe}: no such probe file (write one with train/probe.py)")
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
            approximate_from=_int(conf.get("approximate_from", APPROXIMATE_FROM), "approximate_from", 256, 10**12),
            nprobe=_int(conf.get("nprobe", NPROBE), "nprobe", 1, 1 << 20),
            rescan_seconds=_float(conf.get("rescan_seconds", 30.0), "rescan_seconds", 0.1, 86400),
            prepared_cache=_int(conf.get("prepared_cache", 4), "prepared_cache", 0, 1000),
            volume_modality=modality_code(conf.get("volume_modality", "auto"), "--conf volume_modality"),
            max_voxels=_int(conf.get("max_voxels", DEFAULT_MAX_VOXELS), "max_voxels", 1, 1 << 40),
            sessions_max_bytes=_int(conf.get("sessions_max_bytes", 4 << 30), "sessions_max_bytes", 1 << 20, 1 << 50),
            probe=probe,
        )
        if cfg.precision not in ("fp32", "bf16"):
            raise ValueError(f"--conf precision must be fp32 or bf16, got {cfg.precision!r}")
        if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.device):
            raise ValueError(f"--conf device must be cpu, cuda, cuda:<n> or mps, got {cfg.device!r}")
        from hlip_core.eval.zeroshot import findings_from_text

        try:  # the same rules as a request's findings, checked now rather than at the first request
            findings_from_text(cfg.findings)
        except ValueError as e:
            raise ValueError(f"--conf findings: {e}") from None
        if len(cfg.findings) > cfg.max_findings:
            raise ValueError(f"--conf findings lists {len(cfg.findings)} findings; --conf max_findings is {cfg.max_findings}")
        return cfg

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024
