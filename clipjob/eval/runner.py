"""Evaluating checkpoints: one checkpoint, or `--watch` a run and evaluate each newly committed step once."""

from __future__ import annotations

import json
import time

import torch
import yaml

from clipjob import fs
from clipjob.config import Config, build_config, from_dict, validate
from clipjob.errors import ClipjobError
from clipjob.eval.zeroshot import build_eval_set, evaluate, format_result
from clipjob.model import build_model, build_tokenizer
from clipjob.train import checkpoint as ckpt


def config_for_checkpoint(step_or_file: str, preset: str | None, config_file: str | None,
                          overrides: list[str]) -> Config:
    """The config stored with a clipjob checkpoint, else the one the user names (needed for foreign files)."""
    stored = None if step_or_file.endswith((".pt", ".pth", ".safetensors", ".bin")) else ckpt.load_config_yaml(step_or_file)
    if stored and not (preset or config_file):
        cfg = from_dict(Config, yaml.safe_load(stored))
        if overrides:
            from clipjob.config import merge, parse_override, to_dict

            data = to_dict(cfg)
            for o in overrides:
                data = merge(data, parse_override(o))
            cfg = from_dict(Config, data)
        validate(cfg)
        return cfg
    if not (preset or config_file):
        raise ClipjobError(f"{step_or_file}: no config stored with this checkpoint; pass --preset or --config")
    return build_config(preset, config_file, overrides)


def load_for_eval(checkpoint: str, preset: str | None = None, config_file: str | None = None,
                  overrides: list[str] = (), device: torch.device | None = None, ema: bool = False):
    """The model of a checkpoint, ready for eval; `ema` takes the step's EMA weights (ema.safetensors)."""
    from clipjob.model.convert import load_any_weights

    url = ckpt.resolve_checkpoint(checkpoint)
    cfg = config_for_checkpoint(url, preset, config_file, list(overrides))
    model = build_model(cfg.model, pretrained_text=False)
    model.load_state_dict(load_any_weights(ckpt.ema_weights_url(url) if ema else url, cfg.model))
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), cfg, url


def run_zeroshot(checkpoint: str, data: list[str], *, preset=None, config_file=None, overrides=(),
                 resolution: int = 0, batch_size: int = 256, workers: int = 2, precision: str = "fp32",
                 classnames: str | None = None, templates: str | None = None, out: str | None = None,
                 ema: bool = False) -> list[dict]:
    model, cfg, url = load_for_eval(checkpoint, preset, config_file, overrides, ema=ema)
    tokenizer = build_tokenizer(cfg.model)
    device = next(model.parameters()).device
    size = resolution or cfg.eval.resolution or cfg.model.vision.image_size
    step = _step_of(url)
    results = []
    for spec in data:
        es = build_eval_set(spec, size, cfg.model.vision.family, classnames, templates)
        r = evaluate(model, tokenizer, es, device, batch_size, workers, precision,
                     trim_text=cfg.model.text.trim_padding, worker_nice=cfg.eval.worker_nice)
        r.update(checkpoint=url, step=step, resolution=size, time=time.time(), ema=ema)
        print(format_result(r), flush=True)
        results.append(r)
    if out:
        fs.write_text(out, json.dumps(results, indent=1))
    return results


def _step_of(url: str) -> int | None:
    import re

    m = re.search(r"step-(\d{8})", url)
    return int(m.group(1)) if m else None


def watch(run_dir: str, data: list[str], poll_seconds: float = 60.0, max_polls: int | None = None,
          stop_after_step: int | None = None, **kw) -> int:
    """Evaluate every newly committed checkpoint of a run exactly once, appending to {run}/eval/results.jsonl.
    Steps already present in results.jsonl are skipped, so a restarted watcher does not repeat work."""
    from clipjob.train.metrics import read_jsonl

    results_url = fs.join(run_dir, "eval", "results.jsonl")
    polls, evaluated = 0, 0
    while True:
        done = {(r.get("step"), r.get("data")) for r in read_jsonl(results_url)}
        for step in ckpt.committed_steps(run_dir):
            todo = [d for d in data if (step, d) not in done]
            if not todo:
                continue
            try:
                rs = run_zeroshot(ckpt.step_url(run_dir, step), todo, **kw)
            except ClipjobError as e:
                if "not committed" in str(e) or "not found" in str(e):
                    continue  # pruned by the trainer while we looked; a newer one will come
                raise
            fs.append_text(results_url, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rs))
            evaluated += 1
            if stop_after_step is not None and step >= stop_after_step:
                return evaluated
        polls += 1
        if max_polls is not None and polls >= max_polls:
            return evaluated
        time.sleep(poll_seconds)
