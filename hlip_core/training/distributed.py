"""The process group of a run: torchrun's environment read once, devices, seeds, small collectives.

torchrun (``torchrun --nproc_per_node=G [--nnodes=N ...] train/pretrain.py ...``) sets RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain ``python`` start has none of them and is one
process. GPUs talk over NCCL, CPUs over gloo.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: global rank and world size, rank and size within its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        environ = os.environ if environ is None else environ
        try:
            world = int(environ.get("WORLD_SIZE", "1"))
            rank = int(environ.get("RANK", "0"))
            local_rank = int(environ.get("LOCAL_RANK", str(rank)))
            local_world = int(environ.get("LOCAL_WORLD_SIZE", str(world)))
        except ValueError as exc:
            raise ValueError(f"torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) is not numeric: {exc}") from None
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return cls(rank, world, local_rank, local_world)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, env: DistEnv) -> torch.device:
    """'auto' -> this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no GPU is visible to PyTorch")
    if env.local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {env.local_rank} has no GPU: only {torch.cuda.device_count()} visible on this node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def init_process_group(env: DistEnv, device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU); nothing to do for one process."""
    if not env.distributed or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world, **kwargs)
    log.info("process group: %d processes over %s, this is rank %d", env.world, backend, env.rank)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, step, ...); equal parts give equal seeds on any machine."""
    digest = hashlib.sha256(b"hlip:" + b",".join(str(int(p)).encode() for p in parts)).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def mean_over_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a scalar over all processes (the value itself on one process)."""
    value = value.detach().float().clone()
    if env.distributed:
        dist.all_reduce(value)
        value /= env.world
    return value


def all_gather_json(obj, env: DistEnv, device: torch.device) -> list:
    """Every rank's JSON-able ``obj``, in rank order. Sent as UTF-8 bytes in tensors (no pickle)."""
    if not env.distributed:
        return [obj]
    data = torch.tensor(np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8).copy(), device=device)
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(env.world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in range(env.world)]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].cpu().numpy()).decode()) for p, s in zip(parts, sizes)]


def broadcast_json(obj, env: DistEnv, device: torch.device):
    """Rank 0's JSON-able ``obj`` on every rank."""
    return all_gather_json(obj if env.is_main else None, env, device)[0]
