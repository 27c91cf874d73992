"""The training loop. One process per device; started directly (one process) or by torchrun's elastic agent.

    clipjob train --preset tiny-cpu --set data.train=data/emoji --run-dir runs/demo
    clipjob train --preset corenet-vit-b16 --config my.yaml --nnodes 32 --nproc-per-node 8 ...

Rerunning with the same run directory resumes from the newest committed checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from clipjob import dist, fs
from clipjob.config import Config, to_yaml
from clipjob.data.pipeline import build_train_loader
from clipjob.errors import ClipjobError
from clipjob.model import build_model, build_tokenizer
from clipjob.train import checkpoint as ckpt
from clipjob.train.loss import clip_loss
from clipjob.train.metrics import MetricsLogger
from clipjob.train.optim import build_optimizer, lr_at, set_lr


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    bad_samples: dict[str, int] = field(default_factory=dict)
    good_samples: int = 0


class StopFlag:
    """Set by SIGTERM/SIGINT (preemption, pod deletion): the loop checkpoints and exits cleanly."""

    def __init__(self) -> None:
        self.set = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def save(cfg: Config, model: torch.nn.Module, opt, scaler, state: TrainState, d: dist.DistInfo) -> None:
    """Rank 0 writes step N (weights, full train state, config, marker last), then prunes old steps."""
    if d.is_main:
        train_state = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                       "step": state.step, "samples_seen": state.samples_seen, "bad_samples": state.bad_samples,
                       "good_samples": state.good_samples, "torch_rng": torch.get_rng_state()}
        meta = {"samples_seen": state.samples_seen, "world_size": d.world_size,
                "params": sum(p.numel() for p in model.parameters())}
        ckpt.save_checkpoint(cfg.storage.run_dir, state.step, model.state_dict(), train_state, to_yaml(cfg), meta)
        ckpt.prune_checkpoints(cfg.storage.run_dir, cfg.train.keep_last)
    dist.barrier()


def restore(cfg: Config, model: torch.nn.Module, opt, scaler, d: dist.DistInfo) -> TrainState:
    """Resume from the newest committed step of the run, else start from train.init_from (weights only)."""
    latest = ckpt.latest_checkpoint(cfg.storage.run_dir)
    if latest is None:
        if cfg.train.init_from:
            from clipjob.model.convert import load_any_weights

            model.load_state_dict(load_any_weights(cfg.train.init_from, cfg.model), strict=False)
        return TrainState()
    model.load_state_dict(ckpt.load_weights(latest))
    ts = ckpt.load_train_state(latest)
    opt.load_state_dict(ts["optimizer"])
    if scaler and ts.get("scaler"):
        scaler.load_state_dict(ts["scaler"])
    if d.is_main:
        print(f"resumed from {latest} (step {ts['step']})", flush=True)
    return TrainState(ts["step"], ts["samples_seen"], dict(ts.get("bad_samples", {})), ts.get("good_samples", 0))


def check_bad_fraction(cfg: Config, state: TrainState) -> None:
    bad = sum(state.bad_samples.values())
    total = bad + state.good_samples
    if total >= 1000 and bad / total > cfg.data.max_bad_fraction:
        raise ClipjobError(f"data.train: {bad} of {total} samples were bad ({state.bad_samples}), more than "
                           f"data.max_bad_fraction={cfg.data.max_bad_fraction}; check the shards with `clipjob data inspect`")


def train(cfg: Config) -> TrainState:
    d = dist.init_distributed()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    run_dir = cfg.storage.run_dir
    if d.is_main:
        fs.write_text(fs.join(run_dir, "config.yaml"), to_yaml(cfg))
    model = build_model(cfg.model).to(d.device)
    tokenizer = build_tokenizer(cfg.model)
    opt = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type) if cfg.train.precision == "fp16" else None
    state = restore(cfg, model, opt, scaler, d)
    net = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world_size > 1 else model
    loader = build_train_loader(cfg.data.train, cfg.train.batch_size, cfg.model.vision.image_size, tokenizer,
                                seed=cfg.train.seed, rank=d.rank, start_step=state.step,
                                num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                rrc_scale=cfg.data.rrc_scale, caption_key=cfg.data.caption_key)
    metrics = MetricsLogger(run_dir, d.is_main, cfg.train.steps, state.step)
    stop = StopFlag()
    last_save, t_log, wait, n_log = time.monotonic(), time.monotonic(), 0.0, 0
    model.train()
    batches = iter(loader)
    while state.step < cfg.train.steps:
        # data: time spent waiting here is the data-wait fraction
        t0 = time.monotonic()
        batch = next(batches)
        images, tokens = batch.images.to(d.device, non_blocking=True), batch.tokens.to(d.device, non_blocking=True)
        wait += time.monotonic() - t0
        for reason, n in batch.bad.items():
            state.bad_samples[reason] = state.bad_samples.get(reason, 0) + n
        state.good_samples += images.shape[0]
        # lr schedule
        lr = lr_at(state.step, cfg.train)
        set_lr(opt, lr)
        # forward + backward
        with autocast(cfg.train.precision, d.device):
            out = net(images, tokens)
            loss = clip_loss(out.image_features, out.text_features, out.logit_scale)
            total = loss + out.aux_loss if out.aux_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        (scaler.scale(total) if scaler else total).backward()
        # clip + step
        if scaler:
            scaler.unscale_(opt)
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        model.clamp_logit_scale()
        state.step += 1
        state.samples_seen += images.shape[0] * d.world_size
        n_log += 1
        # log
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            dt = time.monotonic() - t_log
            metrics.log({"step": state.step, "loss": loss.item(), "lr": lr, "logit_scale": out.logit_scale.item(),
                         "samples_per_s": n_log * images.shape[0] * d.world_size / dt, "step_time_s": dt / n_log,
                         "data_wait_frac": wait / dt, "samples_seen": state.samples_seen,
                         "bad_samples": sum(state.bad_samples.values()), "time": time.time()})
            t_log, wait, n_log = time.monotonic(), 0.0, 0
            check_bad_fraction(cfg, state)
        # checkpoint: every N steps, every T minutes, at the end, or when asked to stop
        stopping = dist.broadcast_flag(stop.set, d.device)
        due = (cfg.train.ckpt_every_steps and state.step % cfg.train.ckpt_every_steps == 0) or \
              (cfg.train.ckpt_every_minutes and time.monotonic() - last_save > 60 * cfg.train.ckpt_every_minutes)
        if due or stopping or state.step == cfg.train.steps:
            save(cfg, model, opt, scaler, state, d)
            last_save = time.monotonic()
        if stopping:
            if d.is_main:
                print(f"stop requested: saved step {state.step}, exiting", flush=True)
            break
    metrics.close()
    return state
