"""dist.py: launch spec from flags / PyTorchJob env, the torchrun command line, worker detection, and the
CLI's choice between exec()ing the elastic agent and running as a worker."""

from __future__ import annotations

import tarfile

import pytest
import torch

from clipjob import dist
from clipjob.errors import ClipjobError

ENV_KEYS = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_RDZV_ID",
            "PET_MAX_RESTARTS", "PET_MASTER_ADDR", "PET_MASTER_PORT", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
            "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "PET_NODE_RANK", "PET_SHUTDOWN_TIMEOUT",
            "TORCHELASTIC_ERROR_FILE")


@pytest.fixture
def env(monkeypatch):
    for k in ENV_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CLIPJOB_RUN_DIR", "")  # `clipjob train` sets it before exec(): restored after the test
    return monkeypatch


def test_should_be_single_process_when_nothing_is_set(env):
    spec = dist.launch_spec()
    assert spec.single_process and spec.nnodes == "1" and spec.nproc_per_node == "1"


def test_should_read_the_pytorchjob_env_when_no_flags_are_given(env):
    env.setenv("PET_NNODES", "2:4")
    env.setenv("PET_NPROC_PER_NODE", "2")
    env.setenv("PET_RDZV_ENDPOINT", "job-worker-0:23456")
    env.setenv("PET_RDZV_ID", "job-abc")
    env.setenv("PET_MAX_RESTARTS", "3")
    spec = dist.launch_spec()
    assert spec == dist.LaunchSpec("2:4", "2", "c10d", "job-worker-0:23456", "job-abc", 3)
    assert not spec.single_process


def test_should_launch_two_workers_when_the_env_asks_for_two_processes(env):
    env.setenv("PET_NNODES", "1")
    env.setenv("PET_NPROC_PER_NODE", "2")
    spec = dist.launch_spec()
    assert not spec.single_process
    argv = dist.elastic_launch_argv(spec, ["--preset", "tiny-cpu"])
    assert argv[:2] == ["-m", "clipjob.agent"]
    assert argv[argv.index("--nproc-per-node") + 1] == "2"
    assert argv[argv.index("--rdzv-backend") + 1] == "c10d"
    assert argv[-5:] == ["-m", "clipjob", "train", "--preset", "tiny-cpu"]


def test_should_prefer_flags_over_env_when_both_are_given(env):
    env.setenv("PET_NNODES", "4")
    env.setenv("PET_NPROC_PER_NODE", "8")
    spec = dist.launch_spec(nnodes="1", nproc_per_node="2", rdzv_endpoint="127.0.0.1:1234", max_restarts=1)
    assert (spec.nnodes, spec.nproc_per_node, spec.rdzv_endpoint, spec.max_restarts) == ("1", "2", "127.0.0.1:1234", 1)


def test_should_rendezvous_at_the_master_pod_when_the_job_is_not_elastic(env):
    env.setenv("PET_NNODES", "2")
    env.setenv("PET_NPROC_PER_NODE", "1")
    env.setenv("MASTER_ADDR", "job-master-0")
    env.setenv("MASTER_PORT", "23456")
    env.setenv("PET_NODE_RANK", "1")
    assert dist.launch_spec().rdzv_endpoint == "job-master-0:23456"


def test_should_rendezvous_at_node_0_when_a_trainjob_node_pod_gives_the_trainers_env(env):
    """The env Kubeflow Trainer v2's torch plugin gives node 2 of a 4-node TrainJob "clip-train" (no PET_RDZV_*:
    node 0's address through the JobSet's headless Service, port 29500), with the flags the chart passes
    (charts/train/templates/trainjob.yaml): every node's agent meets at node 0 for a 4-node c10d rendezvous."""
    for k, v in {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
                 "PET_MASTER_ADDR": "clip-train-node-0-0.clip-train", "PET_MASTER_PORT": "29500"}.items():
        env.setenv(k, v)
    spec = dist.launch_spec(nproc_per_node="8", rdzv_id="clip-train", rdzv_backend="c10d", max_restarts=3,
                            shutdown_timeout=165)
    assert spec == dist.LaunchSpec("4", "8", "c10d", "clip-train-node-0-0.clip-train:29500", "clip-train", 3, 165)
    from torch.distributed.run import parse_args

    agent = parse_args(dist.elastic_launch_argv(spec, ["--preset", "tiny-cpu"])[2:])  # torchrun's view, env included
    assert (agent.nnodes, agent.node_rank, agent.nproc_per_node) == ("4", 2, "8")
    assert (agent.rdzv_backend, agent.rdzv_endpoint, agent.rdzv_id) == ("c10d", "clip-train-node-0-0.clip-train:29500",
                                                                        "clip-train")
    assert agent.max_restarts == 3


def test_should_add_the_default_port_when_the_endpoint_has_none(env):
    assert dist.launch_spec(rdzv_endpoint="head").rdzv_endpoint == f"head:{dist.DEFAULT_RDZV_PORT}"


@pytest.mark.parametrize("kw, key", [({"nnodes": "0"}, "--nnodes"), ({"nnodes": "3:2"}, "--nnodes"),
                                     ({"nnodes": "a"}, "--nnodes"), ({"nproc_per_node": "x"}, "--nproc-per-node"),
                                     ({"max_restarts": -1}, "--max-restarts"),
                                     ({"shutdown_timeout": 0}, "--shutdown-timeout")])
def test_should_name_the_flag_when_a_launch_value_is_bad(env, kw, key):
    with pytest.raises(ClipjobError, match=key):
        dist.launch_spec(**kw)


def test_should_refuse_gpu_workers_when_no_gpu_is_visible(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ClipjobError, match="no GPU"):
        dist.launch_spec(nproc_per_node="gpu")
    assert dist.launch_spec(nproc_per_node="auto").nproc_per_node == "1"
    assert dist.launch_spec(nproc_per_node="cpu").nproc_per_node == "1"


def test_should_be_a_worker_only_when_torchrun_set_local_rank(env):
    env.setenv("WORLD_SIZE", "2")  # a PyTorchJob pod: per-node WORLD_SIZE/RANK, no LOCAL_RANK
    env.setenv("RANK", "1")
    assert not dist.is_worker()
    d = dist.init_distributed()
    assert (d.rank, d.world_size, d.is_main) == (0, 1, True)
    env.setenv("LOCAL_RANK", "0")
    assert dist.is_worker()


def test_should_pass_flags_through_when_not_distributed(env):
    device = torch.device("cpu")
    assert dist.any_flags([True, False], device) == [True, False]
    assert dist.all_reduce_mean([2.0, 4.0], device) == [2.0, 4.0]
    dist.barrier()


# -- the CLI's decision -------------------------------------------------------------------------------------


def _cli_train(monkeypatch, tmp_path, *extra: str):
    """Run `clipjob train` in-process with training and exec() stubbed; returns (exec argv or None, trained)."""
    from typer.testing import CliRunner

    from clipjob import cli
    from clipjob.train import trainer

    calls: dict = {"exec": None, "trained": False}

    def fake_exec(path, argv):
        calls["exec"] = argv
        raise SystemExit(0)

    def fake_train(cfg):
        calls["trained"] = True
        return trainer.TrainState(step=cfg.train.steps)

    monkeypatch.setattr(cli.os, "execv", fake_exec)
    monkeypatch.setattr(trainer, "train", fake_train)
    shard = tmp_path / "train-000000.tar"  # the launcher checks that named shards exist before it starts anything
    tarfile.open(shard, "w").close()
    r = CliRunner().invoke(cli.app, ["train", "--preset", "tiny-cpu-scratch", "--run-dir", str(tmp_path / "run"),
                                     "--set", f"data.train={shard}", "--set", "train.steps=3", *extra])
    assert r.exit_code == 0, r.output
    return calls


def test_should_exec_the_elastic_agent_when_the_env_asks_for_workers(env, tmp_path):
    env.setenv("PET_NNODES", "1")
    env.setenv("PET_NPROC_PER_NODE", "2")
    calls = _cli_train(env, tmp_path, "--max-restarts", "2")
    argv = calls["exec"]
    assert argv is not None and not calls["trained"]
    assert argv[1:3] == ["-m", "clipjob.agent"]
    assert argv[argv.index("--max-restarts") + 1] == "2"
    tail = argv[len(argv) - argv[::-1].index("clipjob") - 1:]
    assert tail[:4] == ["clipjob", "train", "--preset", "tiny-cpu-scratch"]
    assert f"storage.run_dir={tmp_path / 'run'}" in tail and "train.steps=3" in tail


def test_should_train_in_process_when_started_by_torchrun(env, tmp_path):
    env.setenv("PET_NNODES", "1")
    env.setenv("PET_NPROC_PER_NODE", "2")
    env.setenv("LOCAL_RANK", "0")  # what torchrun sets in each worker
    env.setenv("WORLD_SIZE", "2")
    env.setenv("RANK", "0")
    calls = _cli_train(env, tmp_path)
    assert calls["exec"] is None and calls["trained"]


def test_should_train_in_process_when_one_process_is_asked_for(env, tmp_path):
    calls = _cli_train(env, tmp_path)
    assert calls["exec"] is None and calls["trained"]


# -- the shutdown window, exit codes ------------------------------------------------------------------------


def test_should_pass_the_shutdown_window_to_the_agent_when_a_flag_or_the_env_sets_it(env):
    assert "--shutdown-timeout" not in dist.elastic_launch_argv(dist.launch_spec(nproc_per_node="2"), [])  # torchrun's 30 s
    env.setenv("PET_SHUTDOWN_TIMEOUT", "165")
    for spec, want in ((dist.launch_spec(nproc_per_node="2"), "165"),
                       (dist.launch_spec(nproc_per_node="2", shutdown_timeout=60), "60")):  # the flag wins
        argv = dist.elastic_launch_argv(spec, ["--preset", "tiny-cpu"])
        assert argv[argv.index("--shutdown-timeout") + 1] == want
        assert argv.index("--shutdown-timeout") < argv.index("train")  # an agent option, not a worker's


def test_should_tell_the_agent_the_run_dir_when_it_execs_it(env, tmp_path):
    import os

    env.setenv("PET_NPROC_PER_NODE", "2")
    argv = _cli_train(env, tmp_path, "--shutdown-timeout", "165")["exec"]
    assert argv[argv.index("--shutdown-timeout") + 1] == "165"
    assert os.environ["CLIPJOB_RUN_DIR"] == str(tmp_path / "run")


@pytest.mark.parametrize("error", [
    RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                 "[127.0.0.1]:10649. This is typically caused by a remote worker crashing. GLHF!"),
    RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation"),
    torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited"),
    torch.distributed.DistStoreError("wait timeout after 60000ms, keys: /clipjob/attempt-0/0"),
    torch.distributed.DistNetworkError("Failed to recv, got 0 bytes. Connection was likely closed."),
])
def test_should_call_it_a_lost_peer_in_one_line_when_a_collective_or_the_store_fails(error):
    line = dist.peer_failure(error)
    assert line and "\n" not in line and line.startswith("lost contact with another rank or the rendezvous store")
    assert "GLHF" not in line and "pair.cc" not in line


@pytest.mark.parametrize("error", [RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("x"),
                                   KeyError("optimizer")])
def test_should_not_call_it_a_lost_peer_when_the_error_is_anything_else(error):
    assert dist.peer_failure(error) is None


def test_should_leave_the_workers_line_where_torchruns_agent_reads_it(env, tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = tmp_path / "error.json"
    dist.record_worker_error("not a worker: nothing written")
    assert not path.exists()
    for k, v in {"LOCAL_RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_ERROR_FILE": str(path)}.items():
        env.setenv(k, v)
    dist.record_worker_error("s3://b/shards/0001.tar: object not found")
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(path))  # torch's own reader
    assert failure.message["message"] == "s3://b/shards/0001.tar: object not found"
