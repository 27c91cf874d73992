"""The one place that reads torchrun / PyTorchJob environment variables.

`clipjob train` as a pod's entrypoint: `elastic_launch_argv` turns flags or the PET_* env a PyTorchJob
injects into a torch.distributed.run (elastic agent, c10d rendezvous) command line that runs the workers.
Started by torchrun directly (LOCAL_RANK etc. set), it is a worker: `init_distributed` joins the group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipjob.errors import ClipjobError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchSpec:
    nnodes: str = "1"
    nproc_per_node: str = "1"
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str = ""
    rdzv_id: str = "clipjob"
    max_restarts: int = 0
    node_rank: str = ""

    @property
    def single_process(self) -> bool:
        return self.nnodes in ("1", "1:1") and self.nproc_per_node in ("1",) and not self.rdzv_endpoint


def is_worker() -> bool:
    """True when torchrun started this process (it sets LOCAL_RANK and TORCHELASTIC_RUN_ID)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_spec(nnodes: str | None = None, nproc_per_node: str | None = None, rdzv_endpoint: str | None = None,
                rdzv_id: str | None = None, rdzv_backend: str | None = None, max_restarts: int | None = None) -> LaunchSpec:
    """Flags win over the PET_* env (PyTorchJob), which wins over single-process defaults."""
    env = os.environ
    nproc = nproc_per_node or env.get("PET_NPROC_PER_NODE") or "1"
    if nproc in ("gpu", "auto"):
        nproc = str(max(1, torch.cuda.device_count())) if torch.cuda.is_available() or nproc == "gpu" else "1"
    elif nproc == "cpu":
        nproc = "1"
    if not nproc.isdigit() or int(nproc) < 1:
        raise ClipjobError(f"--nproc-per-node: expected a positive integer, auto, gpu or cpu, got {nproc!r}")
    spec = LaunchSpec(
        nnodes=str(nnodes or env.get("PET_NNODES") or "1"),
        nproc_per_node=nproc,
        rdzv_backend=rdzv_backend or env.get("PET_RDZV_BACKEND") or "c10d",
        rdzv_endpoint=rdzv_endpoint or env.get("PET_RDZV_ENDPOINT") or "",
        rdzv_id=rdzv_id or env.get("PET_RDZV_ID") or "clipjob",
        max_restarts=int(max_restarts if max_restarts is not None else env.get("PET_MAX_RESTARTS") or 0),
        node_rank=env.get("PET_NODE_RANK", ""),
    )
    for part in spec.nnodes.split(":"):
        if not part.isdigit() or int(part) < 1:
            raise ClipjobError(f"--nnodes: expected N or MIN:MAX with positive integers, got {spec.nnodes!r}")
    return spec


def elastic_launch_argv(spec: LaunchSpec, worker_args: list[str]) -> list[str]:
    """The torch.distributed.run command line that starts the elastic agent, which runs the workers."""
    endpoint = spec.rdzv_endpoint or "127.0.0.1:29400"
    argv = ["-m", "torch.distributed.run", "--nnodes", spec.nnodes, "--nproc-per-node", spec.nproc_per_node,
            "--rdzv-backend", spec.rdzv_backend, "--rdzv-endpoint", endpoint, "--rdzv-id", spec.rdzv_id,
            "--max-restarts", str(spec.max_restarts), "--monitor-interval", "1"]
    return argv + ["-m", "clipjob", "train", *worker_args]


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU), with a timeout."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, local_rank, world, device)


def restart_count() -> int:
    """How many times the elastic agent restarted this worker group (0 on the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank set the flag (e.g. SIGTERM seen by one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
