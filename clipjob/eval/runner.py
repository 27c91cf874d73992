"""Evaluating checkpoints: one checkpoint, or `--watch` a run and evaluate each newly committed step once,
until the run's final step is evaluated.

The final step is read from each checkpoint's own config.yaml (committed atomically with its weights):
a step S whose `train.steps` is <= S is the last one its run will save. The run dir's config.yaml is not
used: it may not exist yet when the watcher starts, and a restart with a different `train.steps` rewrites
it. A step that does not load is skipped with one warning (training rewrites a stale step when it gets
there), unless it is the final step: then nothing will, and the watcher ends with a one-line error. A stop
signal (SIGTERM on pod deletion, via `stop`) abandons the evaluation under way at the next batch: results
are appended only once a step is fully evaluated, so nothing partial is ever written. With `ema`, a run whose
config.yaml says it keeps no EMA weights (train.ema_momentum 0) is a one-line error as soon as that is known,
instead of a warning per step until the run ends.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import torch
import yaml

from clipjob import checkpoint as ckpt
from clipjob import fs
from clipjob.config import Config, build_config, resolve
from clipjob.errors import ClipjobError, RetryableError
from clipjob.eval.zeroshot import build_eval_set, check_spec, evaluate, format_result
from clipjob.model import build_model, build_tokenizer


class EvalStopped(Exception):
    """A signal stopped the evaluation before it finished; nothing partial was written."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by signal {signum} {where}")
        self.signum, self.where = signum, where


def config_for_checkpoint(step_or_file: str, preset: str | None, config_file: str | None,
                          overrides: list[str]) -> Config:
    """The config stored with a clipjob checkpoint, else the one the user names (needed for foreign files)."""
    stored = ckpt.stored_config_yaml(step_or_file)
    if stored and not (preset or config_file):
        return resolve(yaml.safe_load(stored), None, overrides)
    if not (preset or config_file):
        raise ClipjobError(f"{step_or_file}: no config stored with this checkpoint; pass --preset or --config")
    return build_config(preset, config_file, overrides)


def _load_model(url: str, preset: str | None, config_file: str | None, overrides: list[str],
                device: torch.device, ema: bool):
    from clipjob.checkpoint import load_any_weights

    cfg = config_for_checkpoint(url, preset, config_file, overrides)
    model = build_model(cfg.model, pretrained=False)
    model.load_state_dict(load_any_weights(ckpt.ema_weights_url(url) if ema else url, cfg.model))
    return model.to(device).eval(), cfg, url


def load_for_eval(checkpoint: str, preset: str | None = None, config_file: str | None = None,
                  overrides: list[str] = (), device: torch.device | None = None, ema: bool = False):
    """(model ready for eval, config, step URL) of a checkpoint; a run dir gives its newest committed step
    that loads (newer ones that do not are skipped with a warning). `ema` takes the EMA weights."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def load(url: str):
        return _load_model(url, preset, config_file, list(overrides), device, ema)

    if ckpt.is_run_dir(checkpoint):
        return ckpt.load_newest(checkpoint, load)[1]
    return load(ckpt.resolve_checkpoint(checkpoint))


def _stop_point(stop: Any, where: str) -> None:
    """Raise EvalStopped when a stop signal was received (stop: trainer.StopFlag, or None: never)."""
    if stop is not None and stop.set:
        raise EvalStopped(stop.signum, where)


def evaluate_model(model, cfg: Config, url: str, data: list[str], *, resolution: int = 0, batch_size: int = 0,
                   workers: int = 2, precision: str = "fp32", classnames: str | None = None,
                   templates: str | None = None, ema: bool = False, retrieval: bool = False,
                   stop: Any = None) -> list[dict]:
    """One result per --data spec for a loaded checkpoint (printed as it comes); `retrieval`: image<->text
    recall@K too, on every set (each must have captions)."""
    check_data(data, retrieval)
    tokenizer = build_tokenizer(cfg.model)
    device = next(model.parameters()).device
    size = resolution or cfg.eval.resolution or cfg.model.vision.image_size
    step = _step_of(url)
    where = f"while evaluating {url} (abandoned)"
    results = []
    for spec in data:
        es = build_eval_set(spec, size, cfg.model.vision.family, classnames, templates, retrieval=retrieval)
        r = evaluate(model, tokenizer, es, device, batch_size or cfg.eval.batch_size, workers, precision,
                     trim_text=cfg.model.text.trim_padding, worker_nice=cfg.eval.worker_nice,
                     check_stop=lambda: _stop_point(stop, where))
        r.update(checkpoint=url, step=step, resolution=size, time=time.time(), ema=ema)
        print(format_result(r), flush=True)
        results.append(r)
    return results


def run_zeroshot(checkpoint: str, data: list[str], *, preset=None, config_file=None, overrides=(),
                 out: str | None = None, ema: bool = False, stop: Any = None, **eval_kw) -> list[dict]:
    """Evaluate one checkpoint (a run dir: its newest committed step that loads) on each --data spec; write
    the results to `out` once all are done."""
    check_data(data, eval_kw.get("retrieval", False))
    model, cfg, url = load_for_eval(checkpoint, preset, config_file, overrides, ema=ema)
    results = evaluate_model(model, cfg, url, data, ema=ema, stop=stop, **eval_kw)
    _stop_point(stop, f"after evaluating {url} (results not written)")
    if out:
        fs.write_text(out, json.dumps(results, indent=1))
    return results


def check_data(data: list[str], retrieval: bool = False) -> None:
    """A one-line error for a --data spec that cannot be evaluated as asked, before any model is loaded."""
    if not data:
        raise ClipjobError("--data: nothing to evaluate; give at least one eval set")
    for spec in data:
        check_spec(spec, retrieval)


def _step_of(url: str) -> int | None:
    import re

    m = re.search(r"step-(\d{8})", url)
    return int(m.group(1)) if m else None


def check_run_dir(run_dir: str) -> None:
    """A one-line error unless `run_dir` is a run's directory (training wrote config.yaml or checkpoints/)."""
    if fs.bucket_missing(run_dir):
        raise ClipjobError(f"{run_dir}: bucket does not exist (check the run dir URL and AWS_ENDPOINT_URL_S3)")
    if not (fs.exists(fs.join(run_dir, "config.yaml")) or fs.exists(ckpt.checkpoints_url(run_dir))):
        raise ClipjobError(f"{run_dir}: no run there (no config.yaml or checkpoints/): check the URL, or start "
                           f"the watcher once training has started")


def wait_for_run(run_dir: str, wait_s: float, poll_seconds: float, stop: Any = None) -> None:
    """check_run_dir, retried every poll for up to `wait_s` seconds (a watcher started beside a training job
    that has not written its run dir yet); then its one-line error."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return check_run_dir(run_dir)
        except RetryableError:
            raise
        except ClipjobError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClipjobError(f"{e} (waited {wait_s:g} s)" if wait_s else str(e)) from None
            print(f"waiting up to {left:.0f} s for the run at {run_dir} to appear", flush=True)
            _sleep(min(poll_seconds, left), stop)


def _train_value(url: str, key: str) -> Any:
    """train.<key> of the config.yaml in a step folder or run dir (None when it has none or it does not parse)."""
    try:
        return (yaml.safe_load(ckpt.load_config_yaml(url) or "") or {}).get("train", {}).get(key)
    except RetryableError:
        raise
    except (ClipjobError, yaml.YAMLError, AttributeError):
        return None


def target_step(step_url: str) -> int | None:
    """train.steps of the config committed with a step (None when it has none or it does not parse)."""
    steps = _train_value(step_url, "steps")
    return steps if isinstance(steps, int) else None


def check_ema(url: str) -> None:
    """A one-line error when the config.yaml at `url` (a run dir, or a step folder) says the run keeps no EMA
    weights (train.ema_momentum 0): `--watch --ema` would otherwise skip every step, each with a warning, and
    fail only once training is over. Nothing to say while there is no config.yaml yet."""
    momentum = _train_value(url, "ema_momentum")
    if isinstance(momentum, (int, float)) and momentum <= 0:
        raise ClipjobError(f"--ema: the run at {url} keeps no EMA weights (train.ema_momentum={momentum} in its "
                           f"config.yaml): drop --ema, or train with train.ema_momentum > 0")


def _sleep(seconds: float, stop: Any) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _stop_point(stop, "while waiting for the next checkpoint")
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))
    _stop_point(stop, "while waiting for the next checkpoint")


def watch(run_dir: str, data: list[str], poll_seconds: float = 60.0, max_polls: int | None = None,
          stop: Any = None, wait_for_run_s: float = 0.0, preset=None, config_file=None, overrides=(),
          ema: bool = False, **eval_kw) -> int:
    """Evaluate every newly committed checkpoint of a run exactly once, appending to {run}/eval/results.jsonl,
    and return (the number evaluated) once the run's final step is evaluated (see the module doc), or after
    `max_polls` polls. A run dir that does not exist is an error (after waiting `wait_for_run_s` for it).
    Steps already present in results.jsonl are skipped, so a restarted watcher does not repeat work; a step
    that does not load is skipped with one warning (training may still rewrite it)."""
    from clipjob.train.metrics import read_jsonl

    check_data(data, eval_kw.get("retrieval", False))
    wait_for_run(run_dir, wait_for_run_s, poll_seconds, stop)
    if ema:  # the run's config.yaml, written when training starts, says whether EMA weights will come
        check_ema(run_dir)
    results_url = fs.join(run_dir, "eval", "results.jsonl")
    polls, evaluated, warned, targets = 0, 0, set(), {}
    while True:
        done = {(r.get("step"), r.get("data")) for r in read_jsonl(results_url)}
        for step in ckpt.committed_steps(run_dir):
            todo = [d for d in data if (step, d) not in done]
            if not todo:
                continue
            _stop_point(stop, f"before evaluating step {step}")
            try:
                model, cfg, url = load_for_eval(ckpt.step_url(run_dir, step), preset, config_file, overrides, ema=ema)
            except RetryableError:
                raise
            except ClipjobError as e:
                if step not in ckpt.committed_steps(run_dir):
                    continue  # pruned by the trainer while we looked; a newer one will come
                if ema:  # a step saved without EMA: its run has none (no run-dir config.yaml said so up front)
                    check_ema(ckpt.step_url(run_dir, step))
                target = target_step(ckpt.step_url(run_dir, step))
                if target is not None and step >= target:  # training is over: nothing will rewrite it
                    raise ClipjobError(f"step {step} is the run's final step (train.steps={target}) and it does "
                                       f"not load: {e}") from None
                if (step, str(e)) not in warned:  # training rewrites a stale step when it gets there
                    warned.add((step, str(e)))
                    print(f"warning: skipping checkpoint step {step}, it does not load: {e}", file=sys.stderr,
                          flush=True)
                continue
            rs = evaluate_model(model, cfg, url, todo, ema=ema, stop=stop, **eval_kw)
            _stop_point(stop, f"after evaluating step {step} (its results not written)")
            fs.append_text(results_url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rs))
            done.update((step, d) for d in todo)
            evaluated += 1
        for step in sorted({s for s, _ in done if isinstance(s, int)}, reverse=True):
            if all((step, d) in done for d in data):
                if step not in targets:
                    targets[step] = target_step(ckpt.step_url(run_dir, step))
                if targets[step] is not None and step >= targets[step]:
                    print(f"step {step} is the run's final step (train.steps={targets[step]}) and is evaluated: "
                          f"done", flush=True)
                    return evaluated
                break  # only the newest fully evaluated step can be the final one
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return evaluated
        _sleep(poll_seconds, stop)
