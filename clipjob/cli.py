"""The `clipjob` command line: parse, build a config, call one function. No logic lives here."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from typing import Annotated, Optional

import typer

from clipjob.commands.ckpt import ckpt_app
from clipjob.commands.data import data_app
from clipjob.errors import ClipjobError, RetryableError, whole_lines

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Train CLIP models at scale and evaluate zero-shot classification.")
config_app = typer.Typer(no_args_is_help=True, help="Show and import configs.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate checkpoints.")
app.add_typer(config_app, name="config")
app.add_typer(eval_app, name="eval")
app.add_typer(data_app, name="data")
app.add_typer(ckpt_app, name="ckpt")

Preset = Annotated[Optional[str], typer.Option("--preset", "-p", help="Named config (clipjob config presets)")]
ConfigFile = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML config file (any fsspec URL)")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override: key.path=value (repeatable)")]


def _overrides(sets: Optional[list[str]], **extra: Optional[str]) -> list[str]:
    out = list(sets or [])
    out += [f"{k}={v}" for k, v in extra.items() if v]
    return out


def _print_version(value: bool) -> None:
    if value:
        from clipjob import __version__

        typer.echo(f"clipjob {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """Train CLIP models at scale and evaluate zero-shot classification."""


@app.command()
def train(
    preset: Preset = None,
    config: ConfigFile = None,
    set_: Sets = None,
    run_dir: Annotated[Optional[str], typer.Option("--run-dir", help="Run directory URL (storage.run_dir)")] = None,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Initial weights (train.init_from)")] = None,
    nnodes: Annotated[Optional[str], typer.Option(help="Nodes: N or MIN:MAX (default: PET_NNODES or 1)")] = None,
    nproc_per_node: Annotated[Optional[str], typer.Option(help="Workers per node: N|auto|gpu|cpu (PET_NPROC_PER_NODE)")] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(help="HOST:PORT of the c10d rendezvous (PET_RDZV_ENDPOINT)")] = None,
    rdzv_id: Annotated[Optional[str], typer.Option(help="Rendezvous id, unique per job (PET_RDZV_ID)")] = None,
    rdzv_backend: Annotated[Optional[str], typer.Option(help="Rendezvous backend (PET_RDZV_BACKEND, default c10d)")] = None,
    max_restarts: Annotated[Optional[int], typer.Option(help="Worker-group restarts before failing (PET_MAX_RESTARTS)")] = None,
    shutdown_timeout: Annotated[Optional[int], typer.Option(help="Seconds the agent gives the workers to commit their step after SIGTERM, then SIGKILL (PET_SHUTDOWN_TIMEOUT; torchrun's default 30); the chart sets terminationGracePeriodSeconds - 15")] = None,
) -> None:
    """Train (or resume) a CLIP run. Starts torchrun's elastic agent when more than one worker is asked for."""
    from clipjob import dist
    from clipjob.config import build_config

    sets = _overrides(set_, **{"storage.run_dir": run_dir, "train.init_from": init_from})
    cfg = build_config(preset, config, sets)
    if not cfg.storage.run_dir:
        raise ClipjobError("storage.run_dir: no run directory; pass --run-dir DIR_OR_URL")
    if not cfg.data.train:
        raise ClipjobError("data.train: no training data; pass --set data.train=DIR_OR_URL")
    if not dist.is_worker():
        from clipjob.data.shards import parse_sources

        parse_sources(cfg.data.train, check_shards=True)  # a bad data spec: one line, exit 2, before any set-up
        spec = dist.launch_spec(nnodes, nproc_per_node, rdzv_endpoint, rdzv_id, rdzv_backend, max_restarts,
                                 shutdown_timeout)
        config_args = ["--preset", preset] if preset else []
        config_args += ["--config", config] if config else []
        config_args += [a for s in sets for a in ("--set", s)]
        dist.launch(spec, config_args, cfg.storage.run_dir)  # execs the elastic agent unless training alone
    from clipjob.train.trainer import outcome, train as run_training

    state = run_training(cfg)
    code, line = outcome(cfg, state)
    if cfg.eval.data and not code and dist.is_global_main():
        from clipjob.eval.runner import run_zeroshot

        run_zeroshot(cfg.storage.run_dir, [d for d in cfg.eval.data.split(",") if d],
                     batch_size=cfg.eval.batch_size, out=None)
    print(line, flush=True)  # every rank prints its exit line: one write (whole_lines), whole on the shared pipe
    if code:
        raise typer.Exit(code)


@config_app.command("show")
def config_show(preset: Preset = None, config: ConfigFile = None, set_: Sets = None,
                docs: Annotated[bool, typer.Option(help="List every key with its type and doc line")] = False) -> None:
    """Print the resolved config as YAML (or the documented list of keys)."""
    from clipjob.config import build_config, field_docs, to_yaml

    if docs:
        text = "".join(f"{key:32s} {tp:28s} {doc}\n" for key, tp, doc in field_docs())
    else:
        text = to_yaml(build_config(preset, config, list(set_ or [])))
    _print_to_reader(text)


@config_app.command("schema")
def config_schema(chart: Annotated[Optional[str], typer.Option(
        help="Rewrite the `config` subtree of this values.schema.json instead of printing")] = None) -> None:
    """Print the config's JSON schema (each key typed, with its doc line and default), or update a chart's:
    clipjob config schema --chart charts/train/values.schema.json"""
    import json

    from clipjob.chart_schema import write_chart_schema
    from clipjob.config import json_schema

    if chart:
        write_chart_schema(chart)
        typer.echo(f"{chart}: properties.config regenerated from clipjob's config")
    else:
        _print_to_reader(json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n")


def _print_to_reader(text: str) -> None:
    """Print `text`; a reader that stopped early (`| head`) is not an error (click would exit 1)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say at exit


@config_app.command("presets")
def config_presets() -> None:
    """List the named presets."""
    from clipjob.presets import PRESETS

    for name in PRESETS:
        typer.echo(name)


@config_app.command("from-corenet")
def config_from_corenet(file: Annotated[str, typer.Argument(help="CoreNet CLIP YAML config (any fsspec URL)")]) -> None:
    """Print the clipjob config of a CoreNet CLIP YAML; keys without an equivalent are listed on stderr."""
    from clipjob.config_import import corenet_yaml_to_clipjob

    text, ignored = corenet_yaml_to_clipjob(file)
    typer.echo(text, nl=False)
    for line in ignored:
        typer.echo(line, err=True)


@eval_app.command("zeroshot")
def eval_zeroshot(
    data: Annotated[list[str], typer.Option("--data", "-d", help="emoji-heldout:DIR, emoji-heldout-styles:DIR, emoji-seen:DIR, folder:PATH, imagenet:PATH, captions:URL (shards with a .txt caption per image: retrieval only) (repeatable)")],
    checkpoint: Annotated[Optional[str], typer.Option(help="Run dir (newest committed step), step folder or weights file")] = None,
    watch: Annotated[Optional[str], typer.Option(help="Run dir: evaluate each newly committed checkpoint once, until the run's final step (train.steps) is evaluated")] = None,
    preset: Preset = None, config: ConfigFile = None, set_: Sets = None,
    resolution: Annotated[int, typer.Option(help="Eval resolution (0 = the model's)")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per batch (0 = the checkpoint config's eval.batch_size)")] = 0,
    workers: Annotated[int, typer.Option(help="Decoding worker processes")] = 2,
    precision: Annotated[str, typer.Option(help="fp32 or bf16")] = "fp32",
    classnames: Annotated[Optional[str], typer.Option(help="JSON list (or folder->name dict) of class names")] = None,
    templates: Annotated[Optional[str], typer.Option(help="Prompt templates: JSON list or one per line, with {}")] = None,
    out: Annotated[Optional[str], typer.Option(help="Write results JSON here")] = None,
    poll_seconds: Annotated[float, typer.Option(help="--watch: seconds between polls")] = 60.0,
    max_polls: Annotated[Optional[int], typer.Option(help="--watch: stop after this many polls")] = None,
    wait_for_run: Annotated[float, typer.Option(help="--watch: seconds to wait for the run dir to appear (training not started yet) before failing")] = 0.0,
    ema: Annotated[bool, typer.Option("--ema", help="Evaluate the EMA weights (ema.safetensors, train.ema_momentum > 0)")] = False,
    retrieval: Annotated[bool, typer.Option("--retrieval", help="Also image->text and text->image recall@1/5/10 over each set's (image, caption) pairs (the emoji-*: sets; captions: sets always)")] = False,
) -> None:
    """Zero-shot classification accuracy (top-1/top-5) and retrieval recall@K of a checkpoint. SIGTERM abandons
    the evaluation under way (nothing partial is written) and exits 143."""
    from clipjob.eval.runner import EvalStopped, run_zeroshot, watch as watch_run
    from clipjob.train.trainer import StopFlag

    if precision not in ("fp32", "bf16"):
        raise ClipjobError(f"--precision: expected fp32 or bf16, got {precision!r}")
    if not (checkpoint or watch):
        raise ClipjobError("--checkpoint: give a run dir, step folder or weights file (or --watch RUN_DIR)")
    kw = dict(preset=preset, config_file=config, overrides=list(set_ or []), resolution=resolution,
              batch_size=batch_size, workers=workers, precision=precision, classnames=classnames,
              templates=templates, ema=ema, retrieval=retrieval)
    with StopFlag() as stop:
        try:
            if watch:
                n = watch_run(watch, data, poll_seconds=poll_seconds, max_polls=max_polls, stop=stop,
                              wait_for_run_s=wait_for_run, **kw)
                typer.echo(f"evaluated {n} checkpoint(s)")
                return
            run_zeroshot(checkpoint, data, out=out, stop=stop, **kw)
        except EvalStopped as e:  # exit as the signal would: Job/pod policies see an interrupted run, not a result
            typer.echo(f"{e}; nothing partial written; exit {128 + e.signum}")
            raise typer.Exit(128 + e.signum) from None


@app.command()
def report(run: Annotated[str, typer.Argument(help="Run directory URL")],
           out: Annotated[Optional[str], typer.Option(help="PNG path (default RUN/report.png)")] = None) -> None:
    """Plot loss, logit scale, lr, throughput, data wait, MFU, zero-shot accuracy and retrieval over steps into a PNG."""
    from clipjob.report import draw_report

    typer.echo(draw_report(run, out))


@app.command()
def status(
    target: Annotated[Optional[str], typer.Argument(help="Run dir (path or fsspec URL), or a job name")] = None,
    job: Annotated[Optional[str], typer.Option("--job", help="Kubernetes job (PyTorchJob, TrainJob or Job) to show too")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="Job namespace (default: the kubeconfig context's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object per poll with --watch)")] = False,
    watch: Annotated[bool, typer.Option(help="Reprint until the run commits its final step (or the job ends)")] = False,
    interval: Annotated[float, typer.Option(help="--watch: seconds between polls")] = 30.0,
) -> None:
    """Where a run stands: step / total, speed, ETA, data wait, MFU, bad samples, newest checkpoint, latest eval;
    and its Kubernetes job: state, pods, why pods wait or fail, log tails of failing pods."""
    import json

    from clipjob.status import collector, render, watch as watch_status

    collect = collector(target, job, namespace)

    def show(s: dict) -> None:
        typer.echo(json.dumps(s, sort_keys=True) if as_json else render(s), nl=as_json)

    if watch:
        watch_status(collect, show, interval)
    else:
        show(collect())


def main() -> None:
    whole_lines()  # ranks share the agent's stdout and stderr: one write per line
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers fork after the tokenizer is built
    from clipjob.hostmem import tune_malloc

    tune_malloc()  # before any tensor: freed host buffers stay mapped (clipjob/hostmem.py)
    # a process that seems stuck: `kill -USR1 PID` prints every thread's Python stack to stderr; it goes on
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        app()
    except ClipjobError as e:  # one line, and the exit code its kind maps to (clipjob/errors.py)
        _fail(e)
    except Exception as e:  # a lost peer rank or store (gloo, NCCL, TCPStore): retryable, one line
        lost = _peer_failure(e)
        if lost is None:
            raise
        _fail(RetryableError(lost))


def _fail(e: ClipjobError) -> None:
    print(f"error: {e}", file=sys.stderr, flush=True)  # one write (whole_lines): whole on the shared pipe
    if "torch" in sys.modules:  # a torchrun worker: leave the line for the elastic agent to repeat
        from clipjob.dist import record_worker_error

        record_worker_error(str(e))
    sys.exit(e.exit_code)


def _peer_failure(e: Exception) -> str | None:
    if "torch.distributed" not in sys.modules:  # nothing distributed ran in this process
        return None
    from clipjob.dist import peer_failure

    return peer_failure(e)


if __name__ == "__main__":
    main()
