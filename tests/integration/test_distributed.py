"""Distributed training on CPU with gloo: the gathered local loss equals the single-process loss on the
concatenated batch (value and gradients, after DDP's averaging), and `clipjob train` launched from a
PyTorchJob's PET_* env runs two workers with the recipe features switched on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from trainrun import Run, free_port, make_shards, train_argv

WORLD, PER_RANK = 2, 4
# float64 throughout: the sharded and the single-process computations sum the same terms in other orders
# (and gloo's all-reduce adds in its own), so they agree to float64 rounding (~1e-15 of each tensor's scale)
# on any CPU; float32 leaves ~1e-6 that depends on the CPU's kernels
RTOL, ATOL = 1e-9, 1e-12
# (loss, accum_steps, loss groups): groups shared within and across ranks (data.positives_key)
CASES = [("clip", 1, False), ("siglip", 1, False), ("clip", 2, False), ("siglip", 2, False),
         ("clip", 1, True), ("clip", 2, True), ("siglip", 2, True)]
GROUPS = torch.tensor([0, 1, 0, 2, 1, 3, 3, 0])


class TwoTowers(nn.Module):
    """A stand-in CLIP with the same output contract, small enough to compare gradients exactly."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(6, 5)
        self.txt = nn.Linear(3, 5)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.double()

    def forward(self, images, tokens):
        from clipjob.model import CLIPOutput

        return CLIPOutput(F.normalize(self.img(images), dim=-1), F.normalize(self.txt(tokens), dim=-1),
                          self.logit_scale.exp())


def _global_batch():
    g = torch.Generator().manual_seed(42)
    return (torch.randn(WORLD * PER_RANK, 6, generator=g, dtype=torch.float64),
            torch.randn(WORLD * PER_RANK, 3, generator=g, dtype=torch.float64))


def _step(net, model, kind: str, accum: int, images, tokens, groups=None):
    """One step's gradients as the trainer computes them; returns (loss, {name: grad})."""
    from clipjob import dist as cdist
    from clipjob.train.loss import build_loss
    from clipjob.train.step import forward_backward

    loss_fn = build_loss(kind).double()
    out = forward_backward(net, model, loss_fn, images, tokens, accum_steps=accum, precision="fp32", scaler=None,
                           groups=groups)
    cdist.average_grads(list(loss_fn.parameters()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    grads.update({f"loss.{n}": p.grad.clone() for n, p in loss_fn.named_parameters()})
    return out.loss.item(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    images, tokens = _global_batch()
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for kind, accum, grouped in CASES:
        model = TwoTowers()
        groups = GROUPS[local] if grouped else None
        results[f"{kind}-{accum}-{grouped}"] = _step(DDP(model), model, kind, accum, images[local], tokens[local],
                                                     groups)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # as the trainer ends (trainer.settle): both ranks done with every collective before either tears gloo down;
    # without it rank 0 once died of SIGABRT in the teardown ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


def test_should_equal_the_single_process_loss_and_gradients_when_gathered_over_two_ranks(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    images, tokens = _global_batch()
    for kind, accum, grouped in CASES:
        model = TwoTowers()
        ref_loss, ref_grads = _step(model, model, kind, 1, images, tokens, GROUPS if grouped else None)
        local_losses = [r[f"{kind}-{accum}-{grouped}"][0] for r in ranks]
        # the global loss is the mean of the local ones (equal local batches)
        assert sum(local_losses) / WORLD == pytest.approx(ref_loss, rel=RTOL), (kind, accum)
        for r in ranks:  # DDP's average of the per-rank gradients = the full-batch gradient, on every rank
            grads = r[f"{kind}-{accum}-{grouped}"][1]
            assert set(grads) == set(ref_grads)
            for name, g in ref_grads.items():
                assert grads[name].dtype == torch.float64
                torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=ATOL * (g.abs().max().item() or 1.0),
                                           msg=f"{kind} accum={accum} groups={grouped} {name}")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_should_run_two_workers_with_the_recipe_features_when_the_env_asks_for_two(tmp_path):
    data = make_shards(tmp_path / "data", samples=128)
    run = tmp_path / "run"
    env = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "PET_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}"}
    r = Run(train_argv(data, str(run), "train.steps=6", "train.ckpt_every_steps=3", "train.loss=siglip",
                       "train.accum_steps=2", "data.multiscale=true", "data.multiscale_sizes=[24,40]",
                       "train.ema_momentum=0.1", "train.grad_clip=1.0", "train.precision=bf16",
                       "model.range_augment=true", "model.grad_checkpointing=true"), env)
    assert r.wait(240) == 0, r.output
    assert "starting elastic agent: nnodes=1 nproc_per_node=2" in r.output
    meta = json.loads((run / "checkpoints" / "step-00000006" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["samples_seen"] > 0 and meta["ema"]
    rows = _metrics(run)
    assert [m["step"] for m in rows] == list(range(1, 7))
    batch_for = {24: 14, 32: 8, 40: 5}  # floor(32^2 * 8 / s^2): every rank's batch at that step
    assert all(m["batch_size"] == batch_for[m["image_size"]] for m in rows)
    assert sum(m["batch_size"] for m in rows) * 2 == rows[-1]["samples_seen"]
    assert all(k in rows[-1] for k in ("logit_bias", "aux_loss", "grad_norm", "mfu", "samples_per_s_per_device",
                                       "data_wait_frac", "lr", "logit_scale"))
    from safetensors.torch import load_file

    step = run / "checkpoints" / "step-00000006"
    weights, ema = load_file(step / "model.safetensors"), load_file(step / "ema.safetensors")
    assert "image_augmentor.brightness._low" in weights and weights.keys() == ema.keys()
    assert not torch.equal(weights["visual.proj"], ema["visual.proj"])
