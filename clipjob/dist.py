"""The one place that reads torchrun / PyTorchJob environment variables.

`clipjob train` as a pod's entrypoint: `launch_spec` + `elastic_launch_argv` turn flags, or the PET_* env a
PyTorchJob or a Kubeflow Trainer TrainJob injects, into a torch.distributed.run command line (elastic agent,
c10d rendezvous) that `launch` exec()s, so the agent becomes the pod's main process, receives SIGTERM and
forwards it to the workers, which rerun `clipjob train` with the same config arguments.
Started by torchrun directly (LOCAL_RANK etc. set), the process is a worker: `init_distributed` joins the
group (NCCL on GPU, gloo on CPU) with a timeout.

Precedence: flags > PET_* > the master address a non-elastic PyTorchJob or a TrainJob sets (the c10d
rendezvous is hosted there) > single-process defaults. A TrainJob (Trainer v2, fixed size) gives PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK and PET_MASTER_ADDR/PET_MASTER_PORT (node 0, port 29500), no PET_RDZV_*.
Variables clipjob does not translate (PET_RDZV_CONF, PET_STANDALONE, PET_SHUTDOWN_TIMEOUT, ...) are read by
torchrun itself, which takes every option from PET_<OPTION> when the flag is absent.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clipjob.errors import ClipjobError

DEFAULT_RDZV_PORT = 29400
DEFAULT_SHUTDOWN_WINDOW_S = 30  # torchrun's own, when --shutdown-timeout is not given
WINDOW_ENV = "CLIPJOB_SHUTDOWN_WINDOW_S"  # the window, handed by `clipjob train` to itself or its workers
RUN_DIR_ENV = "CLIPJOB_RUN_DIR"  # the run dir whose commits the agent reports (set by `launch`)


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
    shutdown_timeout: int | None = None  # seconds from SIGTERM to SIGKILL of the workers; None: torchrun's 30

    @property
    def single_process(self) -> bool:
        return self.nnodes in ("1", "1:1") and self.nproc_per_node == "1" and not self.rdzv_endpoint


def is_worker() -> bool:
    """True when torchrun started this process (it sets LOCAL_RANK, WORLD_SIZE and TORCHELASTIC_RUN_ID).
    A PyTorchJob pod has WORLD_SIZE/RANK (per node) but no LOCAL_RANK: it is a launcher, not a worker."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def _nproc(value: str) -> str:
    """N, or torchrun's auto|gpu|cpu: one worker per visible GPU; on a CPU-only node one worker (a CPU
    worker already uses every core through intra-op threads)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if value == "gpu" and gpus == 0:
        raise ClipjobError("--nproc-per-node gpu: no GPU is visible on this node (use a number, auto or cpu)")
    if value in ("gpu", "auto"):
        return str(max(1, gpus))
    if value == "cpu":
        return "1"
    if not value.isdigit() or int(value) < 1:
        raise ClipjobError(f"--nproc-per-node: expected a positive integer, auto, gpu or cpu, got {value!r}")
    return value


def _master_endpoint(env: os._Environ | dict) -> str:
    """HOST:PORT of node 0 when no rendezvous endpoint is given, '' if none: a non-elastic PyTorchJob's master
    pod (MASTER_ADDR), a TrainJob's node 0 (PET_MASTER_ADDR: <trainjob>-node-0-0.<trainjob>)."""
    host = env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR")
    port = env.get("PET_MASTER_PORT") or env.get("MASTER_PORT") or str(DEFAULT_RDZV_PORT)
    return f"{host}:{port}" if host else ""


def launch_spec(nnodes: str | None = None, nproc_per_node: str | None = None, rdzv_endpoint: str | None = None,
                rdzv_id: str | None = None, rdzv_backend: str | None = None,
                max_restarts: int | None = None, shutdown_timeout: int | None = None) -> LaunchSpec:
    """Flags win over the PET_* env (PyTorchJob), which wins over single-process defaults."""
    env = os.environ
    restarts = _int_setting(max_restarts, "PET_MAX_RESTARTS", "--max-restarts", 0)
    window = _int_setting(shutdown_timeout, "PET_SHUTDOWN_TIMEOUT", "--shutdown-timeout", None)
    spec = LaunchSpec(
        nnodes=str(nnodes or env.get("PET_NNODES") or "1"),
        nproc_per_node=_nproc(str(nproc_per_node or env.get("PET_NPROC_PER_NODE") or "1")),
        rdzv_backend=rdzv_backend or env.get("PET_RDZV_BACKEND") or "c10d",
        rdzv_endpoint=rdzv_endpoint or env.get("PET_RDZV_ENDPOINT") or _master_endpoint(env),
        rdzv_id=rdzv_id or env.get("PET_RDZV_ID") or "clipjob",
        max_restarts=restarts,
        shutdown_timeout=window,
    )
    parts = spec.nnodes.split(":")
    if len(parts) > 2 or not all(p.isdigit() and int(p) >= 1 for p in parts) or int(parts[0]) > int(parts[-1]):
        raise ClipjobError(f"--nnodes: expected N or MIN:MAX with 1 <= MIN <= MAX, got {spec.nnodes!r}")
    if spec.max_restarts < 0:
        raise ClipjobError(f"--max-restarts: must be >= 0, got {spec.max_restarts}")
    if spec.shutdown_timeout is not None and spec.shutdown_timeout < 1:
        raise ClipjobError(f"--shutdown-timeout: must be >= 1 second, got {spec.shutdown_timeout}")
    if spec.rdzv_endpoint and ":" not in spec.rdzv_endpoint:
        spec = LaunchSpec(**{**spec.__dict__, "rdzv_endpoint": f"{spec.rdzv_endpoint}:{DEFAULT_RDZV_PORT}"})
    return spec


def _int_setting(flag: int | None, env_name: str, flag_name: str, default: int | None) -> int | None:
    value = flag if flag is not None else os.environ.get(env_name) or default
    try:
        return None if value is None else int(value)
    except ValueError:
        raise ClipjobError(f"{flag_name} / {env_name}: expected an integer, got {value!r}") from None


def shutdown_window_s() -> float:
    """Seconds between SIGTERM and SIGKILL for this process: the agent's shutdown window as `launch` handed it
    down (its --shutdown-timeout / PET_SHUTDOWN_TIMEOUT, else torchrun's 30 s). The stop step's save must end
    inside it (storage.stop_wait_s derives from it)."""
    handed = os.environ.get(WINDOW_ENV)
    if not handed:
        return float(_int_setting(None, "PET_SHUTDOWN_TIMEOUT", "--shutdown-timeout", DEFAULT_SHUTDOWN_WINDOW_S))
    try:
        return float(handed)
    except ValueError:
        raise ClipjobError(f"{WINDOW_ENV}: expected seconds, got {handed!r}") from None


def launch(spec: LaunchSpec, config_args: list[str], run_dir: str) -> None:
    """In the process a user or a pod started: hand the shutdown window down (the stop step's storage waits
    are sized to it), and when the spec asks for more than one worker, replace this process with the elastic
    agent, whose workers rerun `clipjob train` with `config_args` (--preset/--config/--set). Returns only when
    this process trains alone."""
    os.environ[WINDOW_ENV] = str(spec.shutdown_timeout or DEFAULT_SHUTDOWN_WINDOW_S)
    if spec.single_process:
        return
    argv = [sys.executable, *elastic_launch_argv(spec, config_args)]
    print(f"starting elastic agent: nnodes={spec.nnodes} nproc_per_node={spec.nproc_per_node} "
          f"rdzv={spec.rdzv_backend}://{spec.rdzv_endpoint or '127.0.0.1:29400'} id={spec.rdzv_id}", flush=True)
    os.environ[RUN_DIR_ENV] = run_dir  # the agent reports the commits it finds there
    os.execv(sys.executable, argv)


def is_global_main() -> bool:
    """Rank 0 of the whole job (or a lone process), also outside an initialised process group."""
    return int(os.environ.get("RANK", 0)) == 0


def elastic_launch_argv(spec: LaunchSpec, worker_args: list[str]) -> list[str]:
    """The `python -m clipjob.agent ...` arguments (torchrun's own, see agent.py) that start the elastic agent
    and its workers. `--shutdown-timeout` is how long the agent waits, after forwarding SIGTERM, for the
    workers to commit their step before it SIGKILLs them: the chart sets it from the pod's grace period."""
    endpoint = spec.rdzv_endpoint or f"127.0.0.1:{DEFAULT_RDZV_PORT}"
    argv = ["-m", "clipjob.agent", "--nnodes", spec.nnodes, "--nproc-per-node", spec.nproc_per_node,
            "--rdzv-backend", spec.rdzv_backend, "--rdzv-endpoint", endpoint, "--rdzv-id", spec.rdzv_id,
            "--max-restarts", str(spec.max_restarts), "--monitor-interval", "1"]
    if spec.shutdown_timeout is not None:
        argv += ["--shutdown-timeout", str(spec.shutdown_timeout)]
    return argv + ["-m", "clipjob", "train", *worker_args]


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); a lone process is rank 0
    of 1 whatever WORLD_SIZE/RANK a PyTorchJob put in its environment."""
    worker = is_worker()
    rank = int(os.environ["RANK"]) if worker else 0
    world = int(os.environ["WORLD_SIZE"]) if worker else 1
    local_rank = int(os.environ["LOCAL_RANK"]) if worker else 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _worker_store(rank, world, timeout)
        if device.type == "cuda":
            dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, local_rank, world, device)


def _worker_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The workers' key-value store, in a namespace that every node of one worker group agrees on and that no
    other group uses (a group reading another's keys, its gloo/NCCL addresses, would fail to connect).

    Under clipjob.agent (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0's worker hosts a new store for each
    rendezvous round, at the address the round published (MASTER_PORT is a fresh port each round): the address
    names the group, also when a replaced node (restart count 0) joins a survivor (restart count 1).
    Under plain torchrun the agent hosts one store at one address for the whole job; there the restart attempt
    separates the groups (right on one node; a replaced node does not rejoin such a job, see docs)."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    hosts = rank == 0 and not agent_hosts
    store = dist.TCPStore(host, port, world, is_master=hosts, timeout=timeout, multi_tenant=hosts)
    group = f"attempt-{restart_count()}" if agent_hosts else f"{host}:{port}"
    return dist.PrefixStore(f"clipjob/{group}", store)


def restart_count() -> int:
    """How many times this node's agent restarted its worker group (0 on the first attempt). Per node: a
    replacement node starts at 0 while the survivors count on."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def record_worker_error(message: str) -> None:
    """Leave a worker's one-line error in the file torchrun's agent reads when the worker exits
    (TORCHELASTIC_ERROR_FILE, torch's format), so the agent can repeat it (clipjob/agent.py)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE") if is_worker() else None
    if not path:
        return
    import json
    import time

    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:  # the agent then says "exited N" without the line; the line is in the log anyway
        pass


# gloo reports a vanished peer as a plain RuntimeError from its TCP transport ("Connection closed by peer",
# "Connection reset by peer", a recv/send timeout); NCCL, the store and the network raise DistError kinds
_GLOO_TRANSPORT = ("gloo/transport", "Connection closed by peer", "Connection reset by peer")


def peer_failure(e: BaseException) -> str | None:
    """A one-line description when `e` means another rank or the rendezvous store went away (a retry can
    succeed: the agent restarts the group, or the operator the pod), else None."""
    text = str(e).strip()
    if not isinstance(e, dist.DistError) and not (isinstance(e, RuntimeError) and any(s in text for s in _GLOO_TRANSPORT)):
        return None
    first = (text.splitlines() or [type(e).__name__])[0]
    first = first.split("] ", 1)[1] if first.startswith("[") and "] " in first else first  # drop the C++ file:line
    first = first.split(". ", 1)[0]  # gloo goes on with advice and an emoji
    return (f"lost contact with another rank or the rendezvous store ({type(e).__name__}: {first[:200]}); "
            f"a restart resumes from the newest committed step")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def any_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank if any rank set it (SIGTERM seen by one process, a save due by the
    clock): one small all-reduce so every rank takes the same decision at the same step."""
    if not _active():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in t.tolist()]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not _active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    world = dist.get_world_size() if _active() else 1
    return [v / world for v in all_reduce_sum(values, device)]


def average_grads(params: list[torch.Tensor]) -> None:
    """Average .grad over ranks for parameters outside the DDP module (e.g. SigLIP's logit bias)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not _active() or not grads:
        return
    for g in grads:
        dist.all_reduce(g)
        g /= dist.get_world_size()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
