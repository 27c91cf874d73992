"""The training loop. One process per device; started directly (one process) or by torchrun's elastic agent.

    clipjob train --preset tiny-cpu --set data.train=data/emoji --run-dir runs/demo
    clipjob train --preset corenet-vit-b16 --config my.yaml --nnodes 32 --nproc-per-node 8 ...

Rerunning with the same run directory resumes from the newest committed checkpoint. SIGTERM/SIGINT (pod
deletion, preemption, the elastic agent shutting the group down) makes every rank stop at the same step,
after a checkpoint of that step is committed.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from clipjob import checkpoint as ckpt
from clipjob import dist, fs
from clipjob.config import Config, to_yaml
from clipjob.data.device_decode import materialize
from clipjob.data.multiscale import build_schedule
from clipjob.data.pipeline import build_train_loader, next_batch
from clipjob.data.shards import derive_seed, parse_sources
from clipjob.data.transforms import Augment, to_unit_float
from clipjob.errors import ClipjobError, RetryableError
from clipjob.model import build_model, build_tokenizer
from clipjob.model.tokenizer import trim_padding
from clipjob.train.ema import EMA
from clipjob.train.loss import ContrastiveLoss, build_loss
from clipjob.train.flops import choose_precision, flops_per_sample, peak_flops
from clipjob.train.metrics import MetricsLogger, Throughput
from clipjob.train.optim import build_optimizer, lr_at, set_lr
from clipjob.train.saver import CheckpointSaver
from clipjob.train.step import StepResult, forward_backward, optimizer_step

@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    bad_samples: dict[str, int] = field(default_factory=dict)
    good_samples: int = 0
    stopped_by: int = 0  # the signal that stopped training before train.steps (SIGTERM when another rank got it)
    ckpt_stall_s: float = 0.0  # seconds rank 0's training thread spent in saves since the last metrics record
    budget_steps: int = 0  # train.steps as train.budget_minutes set it (0: not set yet, or no budget)


@dataclass
class Parts:
    """Everything the loop updates: the model, its loss (SigLIP's bias), optimizer, grad scaler, EMA."""

    model: nn.Module
    loss_fn: ContrastiveLoss
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: EMA | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]


class StopFlag:
    """Set by SIGTERM/SIGINT (preemption, pod deletion, the agent stopping the group): the loop checkpoints
    and exits cleanly at the next step boundary, on every rank at the same step. A second signal, or any
    signal once training is over (a context manager), acts as usual and ends the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum = 0  # the first signal received (0: none)
        self._previous: dict[int, Any] = {}

    @property
    def set(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> StopFlag:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:  # asked twice: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.signum = signum


# ---------------------------------------------------------------------------------------------------------
# set-up


def build_parts(cfg: Config, d: dist.DistInfo) -> Parts:
    torch.manual_seed(cfg.train.seed)  # same init on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(cfg.model).to(d.device)
    loss_fn = build_loss(cfg.train.loss, cfg.model.ensemble).to(d.device)
    opt = build_optimizer(model, cfg.train, loss_fn)
    scaler = torch.amp.GradScaler(d.device.type) if cfg.train.precision == "fp16" else None
    return Parts(model, loss_fn, opt, scaler)


def wrap_model(model: nn.Module, cfg: Config, d: dist.DistInfo) -> nn.Module:
    """torch.compile (in place, so the no-grad caching pass is compiled too), then DDP across ranks."""
    if cfg.train.compile:
        model.compile()
    if d.world_size == 1:
        return model
    return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def build_loader(cfg: Config, d: dist.DistInfo, start_step: int):
    schedule = None
    if cfg.data.multiscale:
        schedule = build_schedule(cfg.data.multiscale_sizes, cfg.model.vision.image_size, cfg.train.batch_size,
                                  cfg.train.seed)
    return build_train_loader(cfg.data, batch_size=cfg.train.batch_size, image_size=cfg.model.vision.image_size,
                              tokenizer=build_tokenizer(cfg.model), seed=cfg.train.seed, rank=d.rank,
                              start_step=start_step, batch_schedule=schedule)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def save(cfg: Config, parts: Parts, state: TrainState, d: dist.DistInfo, saver: CheckpointSaver | None = None,
         background: bool = False) -> None:
    """Rank 0 writes step N (weights, EMA, full train state, config, marker last) and prunes old steps, after
    the save still in flight. In the background (`background` and train.ckpt_async: train/saver.py) rank 0
    only snapshots the state to host memory and the other ranks go on at once; otherwise (the stop step, the
    last step) every rank waits until the step is committed."""
    background = background and saver is not None and saver.background
    if d.is_main:
        tree = {"model": parts.model.state_dict(), "ema": parts.ema.state_dict() if parts.ema else None,
                "train_state": {"optimizer": parts.opt.state_dict(), "loss": parts.loss_fn.state_dict(),
                                "scaler": parts.scaler.state_dict() if parts.scaler else {}, "step": state.step,
                                "samples_seen": state.samples_seen, "bad_samples": state.bad_samples,
                                "good_samples": state.good_samples, "budget_steps": state.budget_steps}}
        meta = {"samples_seen": state.samples_seen, "world_size": d.world_size, "ema": parts.ema is not None,
                "params": sum(p.numel() for p in parts.model.parameters())}
        run_dir, step, config_yaml = cfg.storage.run_dir, state.step, to_yaml(cfg)

        def write(t: dict) -> None:  # on the writer thread when in the background: file I/O only
            extra = {ckpt.EMA_FILE: t["ema"]} if t["ema"] is not None else None
            ckpt.save_checkpoint(run_dir, step, t["model"], t["train_state"], config_yaml, meta, extra)
            ckpt.prune_checkpoints(run_dir, cfg.train.keep_last)

        state.ckpt_stall_s += (saver or CheckpointSaver(background=False)).save(step, write, tree, background)
    if not background:
        dist.barrier()


def settle(saver: CheckpointSaver, d: dist.DistInfo) -> None:
    """Every rank waits until rank 0's save in flight is committed (its error is raised on rank 0)."""
    saver.wait()
    dist.barrier()


def _load(parts: Parts, url: str) -> tuple[dict, dict | None]:
    """Weights and train state of one committed step into the parts (ClipjobError if it does not fit);
    returns the train state and the EMA weights (None without)."""
    weights, ts, ema = ckpt.load_weights(url), ckpt.load_train_state(url), ckpt.load_ema(url)
    try:
        parts.model.load_state_dict(weights)
        parts.opt.load_state_dict(ts["optimizer"])
        parts.loss_fn.load_state_dict(ts.get("loss", {}))
        if parts.scaler is not None and ts.get("scaler"):
            parts.scaler.load_state_dict(ts["scaler"])
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise ClipjobError(f"{url}: checkpoint does not fit this run's config (model, train.loss or optimizer "
                           f"changed?): {first}") from None
    return ts, ema


def restore(cfg: Config, parts: Parts, d: dist.DistInfo) -> TrainState:
    """Resume from the newest committed step that loads (an unreadable one is skipped with a warning),
    else start from train.init_from (weights only). The EMA resumes too, or starts from the weights."""
    ts = ema = None
    if ckpt.committed_steps(cfg.storage.run_dir):  # (a storage outage propagates: never fall back past it)
        url, (ts, ema) = ckpt.load_newest(cfg.storage.run_dir, lambda u: _load(parts, u), warn=d.is_main)
        if d.is_main:
            print(f"resumed from {url} (step {ts['step']})", flush=True)
    if ts is None and cfg.train.init_from:
        from clipjob.checkpoint import load_any_weights

        parts.model.load_state_dict(load_any_weights(cfg.train.init_from, cfg.model), strict=False)
    if cfg.train.ema_momentum > 0:
        parts.ema = EMA(parts.model, cfg.train.ema_momentum)
        if ema is not None:
            parts.ema.load_state_dict(ema)
    if ts is None:
        return TrainState()
    return TrainState(ts["step"], ts["samples_seen"], dict(ts.get("bad_samples", {})), ts.get("good_samples", 0),
                      budget_steps=int(ts.get("budget_steps", 0)))


# ---------------------------------------------------------------------------------------------------------
# per-step pieces


def begin_step(cfg: Config, parts: Parts, step: int, rank: int) -> float:
    """Everything that is a function of the step number, so a resumed run continues the same curves: the
    learning rate, the RNG (RangeAugment's draws) and RangeAugment's PSNR curriculum."""
    lr = lr_at(step, cfg.train)
    set_lr(parts.opt, lr)
    torch.manual_seed(derive_seed(cfg.train.seed, rank, step))
    augmentor = getattr(parts.model, "image_augmentor", None)
    if augmentor is not None and hasattr(augmentor, "set_progress"):
        augmentor.set_progress(step / cfg.train.steps)
    return lr


def count_samples(state: TrainState, batch) -> None:
    for reason, n in batch.bad.items():
        state.bad_samples[reason] = state.bad_samples.get(reason, 0) + n
    state.good_samples += batch.tokens.shape[0] - batch.replaced


def check_bad_fraction(cfg: Config, state: TrainState) -> None:
    bad = sum(state.bad_samples.values())
    total = bad + state.good_samples
    if total >= 1000 and bad / total > cfg.data.max_bad_fraction:
        raise ClipjobError(f"data.train: {bad} of {total} samples were bad ({state.bad_samples}), more than "
                           f"data.max_bad_fraction={cfg.data.max_bad_fraction}; check the shards with `clipjob data inspect`")


def log_step(metrics: MetricsLogger, speed: Throughput, state: TrainState, out: StepResult, lr: float,
             grad_norm: torch.Tensor | None, parts: Parts, images: torch.Tensor, d: dist.DistInfo) -> None:
    """One metrics record. Every rank calls this (the loss is averaged over ranks); rank 0 writes."""
    aux = float(out.aux_loss) if out.aux_loss is not None else 0.0
    loss, aux = dist.all_reduce_mean([float(out.loss), aux], d.device)
    record = {"step": state.step, "loss": loss, "lr": lr, "logit_scale": float(out.logit_scale),
              **speed.take(), "samples_seen": state.samples_seen, "bad_samples": sum(state.bad_samples.values()),
              "bad_samples_by_reason": dict(sorted(state.bad_samples.items())),
              "image_size": images.shape[-1], "batch_size": images.shape[0], "time": time.time()}
    if out.aux_loss is not None:
        record["aux_loss"] = aux
    if parts.loss_fn.logit_bias is not None:
        record["logit_bias"] = parts.loss_fn.logit_bias.item()
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if state.ckpt_stall_s:
        record["ckpt_stall_s"], state.ckpt_stall_s = round(state.ckpt_stall_s, 3), 0.0
    metrics.log(record)


def save_due(cfg: Config, step: int) -> bool:
    return step == cfg.train.steps or bool(cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0)


def agree_due(cfg: Config, step: int, device: torch.device, world_size: int) -> bool:
    """Whether the ranks compare their stop / clock flags before the step after `step`. The comparison is an
    all-reduce whose value the host reads, so on a GPU it waits for the previous step and the next step's
    kernels cannot queue behind it: every `train.agree_every` steps there (default 10; SIGTERM is honoured
    within that many steps), every step on the CPU and for a single process, where it costs nothing."""
    every = cfg.train.agree_every or (10 if device.type == "cuda" else 1)
    return world_size == 1 or step % every == 0


STOP_MARGIN_S = 5.0  # of the shutdown window, left for the exit after the stop step's save


def stop_grace_s(cfg: Config) -> float:
    """How long storage calls may still take after a stop request: storage.stop_wait_s, or (0) the shutdown
    window minus a margin, so that a multi-GiB save of the stop step uses the whole window the chart gives it."""
    return cfg.storage.stop_wait_s or max(1.0, dist.shutdown_window_s() - STOP_MARGIN_S)


def bound_storage_waits(cfg: Config, stop: StopFlag) -> None:
    """Storage calls of this process wait at most storage.stall_timeout_s for storage that does not answer,
    and end at most stop_grace_s after a stop request (then RetryableError: exit 203)."""
    fs.configure(cfg.storage.stall_timeout_s, "storage.stall_timeout_s")
    fs.on_stop(lambda: stop.set, stop_grace_s(cfg))


class Next(NamedTuple):
    batch: Any  # None: the run stops at the last completed step
    clock_due: bool  # a save is due by the clock after this step
    stop_note: str = ""  # " while waiting for data" when a rank (any: the flag is agreed) was still waiting


def wait_for_batch(batches, stop: StopFlag, cfg: Config, d: dist.DistInfo, step: int, last_save: float) -> Next:
    """The next batch, or None when a stop request came (before or while waiting for the batch): the run then
    stops at `step`, the last completed one. Ranks stop
    only at steps where they all agree (agree_due); at those, every rank joins one all-reduce of its stop and
    clock flags after its wait and before the forward pass, so none is left in a collective the others skipped.
    Waits are bounded by data.stall_timeout_s (pipeline.next_batch)."""
    can_stop = agree_due(cfg, step, d.device, d.world_size)
    batch = next_batch(batches, lambda: can_stop and stop.set, cfg.data.stall_timeout_s)
    if batch is None and not can_stop:  # a read in this process gave up at a step the ranks cannot stop at
        raise RetryableError(f"stopped while waiting for data at step {step}, between the steps where the ranks "
                             f"agree (train.agree_every); exiting as retryable without a checkpoint")
    if not can_stop:
        return Next(batch, False)
    stopping, clock_due, starved = dist.any_flags([batch is None or stop.set, minutes_due(cfg, last_save),
                                                   batch is None], d.device)
    return Next(None, False, " while waiting for data" if starved else "") if stopping else Next(batch, clock_due)


def minutes_due(cfg: Config, last_save: float) -> bool:
    return bool(cfg.train.ckpt_every_minutes) and time.monotonic() - last_save > 60 * cfg.train.ckpt_every_minutes


# ---------------------------------------------------------------------------------------------------------
# the loop


def train(cfg: Config) -> TrainState:
    """Train until train.steps, or until a stop signal (then state.step < train.steps)."""
    # the stop flag first: a SIGTERM during set-up must not end the process before it can save
    with StopFlag() as stop, CheckpointSaver(cfg.train.ckpt_async) as saver:
        state = run(cfg, stop, saver)
    dist.cleanup()
    return state


def outcome(cfg: Config, state: TrainState) -> tuple[int, str]:
    """(exit code, last line) of a training process. A stopped run is interrupted, not finished: it exits
    128 + the signal, as a process killed by it would, so that Kubernetes restart policies (PyTorchJob
    ExitCode: 128+ is retryable) and torchrun treat it as such; the next start resumes from the checkpoint
    just committed."""
    if state.stopped_by:
        code = 128 + state.stopped_by
        total = state.budget_steps or cfg.train.steps
        return code, (f"stopped by signal {state.stopped_by} at step {state.step} of {total} (checkpoint "
                      f"committed; a restart resumes from it); exit {code}")
    return 0, f"done: step {state.step}, {state.samples_seen} samples; run dir {cfg.storage.run_dir}"


def settle_precision(cfg: Config, d: dist.DistInfo) -> Config:
    """train.precision=auto -> the precision this run uses (bf16 only when every rank measured it faster), so
    the config every later step and the run's config.yaml see says what ran."""
    if cfg.train.precision != "auto":
        return cfg
    chosen, why = choose_precision(d.device, "auto")
    if d.world_size > 1 and dist.any_flags([chosen != "bf16"], d.device)[0]:
        chosen, why = "fp32", f"{why}; another rank measured bf16 slower"
    if d.is_main:
        print(f"train.precision: auto -> {chosen} ({why})", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=chosen))


def write_run_config(cfg: Config) -> None:
    """The run dir's config.yaml: what `clipjob status` and `eval --watch` read (rank 0 only)."""
    fs.write_text(fs.join(cfg.storage.run_dir, "config.yaml"), to_yaml(cfg))


BUDGET_MARGIN = 0.97  # of the budget left when planning: the final save and the step-time noise


class BudgetPlan:
    """train.budget_minutes: sets train.steps to what the budget holds, from the time the steps take, up to
    PLANS times.

    First at step min(warmup_steps, 100) (at least 10), from the second half of the steps so far (after the data
    pipeline's start-up): before the cosine decay starts, so a budget too short for the run is cut before it
    decays. Then again each time a third of the way to the last plan's end has run, from the steps since that
    plan: early steps run slower than later ones (caches fill: the frozen text tower's caption features cost ~30 %
    of the demo's first epoch on the CPU), so later plans, from steadier steps, usually give more (the demo on
    an AVX2 EPYC: 1.12 s/step over steps 30-60, 0.95 over 60-178, ~0.85 after its first epoch). Each later plan
    moves the learning rate of its step by a few percent (a cosine over the new length from there on). Never
    more than the configured train.steps. A run resumed after a plan keeps its steps (saved in the train state)
    and plans no more; one resumed before the first plan times a window from where it resumed, the budget then
    counting from the restart."""

    PLANS = 3

    def __init__(self, cfg: Config, state: TrainState, started: float):
        self.started, self.cap = started, cfg.train.steps
        self.at = self.gap = max(10, min(cfg.train.warmup_steps, 100))  # gap: the fewest steps a plan times
        self.window_from = max(self.at // 2, state.step)
        self.at = max(self.at, self.window_from + 5)
        self.plans_left = 0 if cfg.train.budget_minutes <= 0 or state.budget_steps > 0 or cfg.train.steps <= self.at \
            else self.PLANS
        self.window_start: float | None = time.monotonic() if state.step == self.window_from else None

    def after_step(self, cfg: Config, state: TrainState, d: dist.DistInfo) -> Config:
        if not self.plans_left:
            return cfg
        if state.step == self.window_from:
            self.window_start = time.monotonic()
        if state.step < self.at or self.window_start is None:
            return cfg
        self.plans_left -= 1
        now = time.monotonic()
        # every rank takes the same numbers (the ranks step in lockstep; the mean only irons out the clocks)
        step_s, elapsed = dist.all_reduce_mean([(now - self.window_start) / (state.step - self.window_from),
                                                now - self.started], d.device)
        left = cfg.train.budget_minutes * 60 - elapsed
        steps = min(self.cap, state.step + max(0, int(left * BUDGET_MARGIN / step_s)))
        state.budget_steps = steps
        if d.is_main:
            print(f"train.budget_minutes={cfg.train.budget_minutes:g}: {step_s:.3f} s/step over steps "
                  f"{self.window_from}-{state.step}, {max(0.0, left) / 60:.1f} min left -> train.steps "
                  f"{cfg.train.steps} -> {steps}", flush=True)
        self.window_from, self.window_start = state.step, now  # the next plan's window starts here
        self.at = state.step + max(self.gap, (steps - state.step) // 3)
        if self.at >= steps:
            self.plans_left = 0
        if steps == cfg.train.steps:
            return cfg
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
        if d.is_main:
            write_run_config(cfg)
        return cfg


def run(cfg: Config, stop: StopFlag, saver: CheckpointSaver) -> TrainState:
    started = time.monotonic()  # train.budget_minutes counts from here
    d = dist.init_distributed(cfg.train.dist_timeout_s)
    bound_storage_waits(cfg, stop)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    cfg = settle_precision(cfg, d)
    if d.is_main:  # the data spec first: a bad one (missing shard, bucket, manifest) writes nothing to the run dir
        parse_sources(cfg.data.train, check_shards=True)
    parts = build_parts(cfg, d)
    state = restore(cfg, parts, d)
    if cfg.train.budget_minutes > 0 and state.budget_steps:  # planned before the restart: keep its length
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=state.budget_steps))
    if d.is_main:  # once the run resumed: a config its checkpoints do not fit leaves the run's record as it was
        write_run_config(cfg)
    budget = BudgetPlan(cfg, state, started)
    net = wrap_model(parts.model, cfg, d)
    # the peak before the loader starts: its workers fill the shuffle buffer at once, and a peak measured while
    # they share the cores reads low (every MFU after it high)
    peak = peak_flops(d.device, cfg.train.precision, cfg.train.peak_flops) if d.is_main else 0.0
    batches = iter(build_loader(cfg, d, state.step))
    metrics = MetricsLogger(cfg.storage.run_dir, d.is_main, cfg.train.steps, state.step)
    speed = Throughput(d.world_size, peak, remeasure=(lambda: peak_flops(d.device, cfg.train.precision))
                       if d.is_main and not cfg.train.peak_flops else None)
    augment = Augment.of(cfg.data)  # data.decode=gpu runs it on the device
    last_save, saved = time.monotonic(), state.step  # (the step resumed from is committed; step 0 has nothing)
    parts.model.train()
    while state.step < cfg.train.steps:
        saver.raise_failure()  # a background save that failed ends the run here, with its own error
        # data: the time blocked here is the data-wait fraction
        t0 = time.monotonic()
        batch, clock_due, waited = wait_for_batch(batches, stop, cfg, d, state.step, last_save)
        if batch is None:  # asked to stop: commit the last completed step (every rank agreed to stop here)
            if state.step != saved:
                metrics.flush()
                save(cfg, parts, state, d, saver)  # after the save in flight, and every rank waits for it
            else:
                settle(saver, d)
            state.stopped_by = int(stop.signum or signal.SIGTERM)
            if d.is_main:
                print(f"stop requested{waited}: saved step {state.step}, exiting" if state.step
                      else f"stop requested{waited}: nothing to save at step 0, exiting", flush=True)
            break
        batch = materialize(batch, d.device, augment)  # data.decode=gpu: JPEGs decoded here
        images = to_unit_float(batch.images)  # uint8 over the wire, float here
        tokens = trim_padding(batch.tokens) if cfg.model.text.trim_padding else batch.tokens
        tokens = tokens.to(d.device, non_blocking=True)
        speed.waited(time.monotonic() - t0)
        count_samples(state, batch)
        # lr, RNG and curriculum follow the step
        lr = begin_step(cfg, parts, state.step, d.rank)
        # forward + backward (micro-batches with cached features when train.accum_steps > 1)
        groups = None if batch.groups is None else batch.groups.to(d.device, non_blocking=True)
        out = forward_backward(net, parts.model, parts.loss_fn, images, tokens, accum_steps=cfg.train.accum_steps,
                               precision=cfg.train.precision, scaler=parts.scaler, groups=groups)
        # clip, optimizer step, logit-scale clamp, EMA
        grad_norm = optimizer_step(parts.opt, parts.scaler, parts.params, list(parts.loss_fn.parameters()),
                                   cfg.train.grad_clip)
        parts.model.clamp_logit_scale()
        if parts.ema is not None:
            parts.ema.update(parts.model)
        state.step += 1
        state.samples_seen += images.shape[0] * d.world_size
        speed.stepped(images.shape[0], images.shape[0] * flops_per_sample(cfg.model, images.shape[-1]))
        planned = cfg.train.steps
        cfg = budget.after_step(cfg, state, d)  # train.budget_minutes: sets train.steps, at two steps
        if cfg.train.steps != planned:
            metrics.set_total(cfg.train.steps)
        # log
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            log_step(metrics, speed, state, out, lr, grad_norm, parts, images, d)
            check_bad_fraction(cfg, state)
        # checkpoint: every N steps, every T minutes (agreed before the step), at the end (that one committed
        # before returning); in the background but the last
        if clock_due or save_due(cfg, state.step):
            metrics.flush()  # metrics are durable up to the checkpoint a restart resumes from
            save(cfg, parts, state, d, saver, background=state.step < cfg.train.steps)
            last_save, saved = time.monotonic(), state.step
    metrics.close()
    return state
