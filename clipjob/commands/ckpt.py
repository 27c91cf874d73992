"""`clipjob ckpt ...`: inspect and convert checkpoints.

    clipjob ckpt convert --from corenet clip_vit_base.pt ckpt/     # a step folder: weights + config.yaml
    clipjob ckpt convert --from openai vit_b32_openai.safetensors vitb32/
    clipjob ckpt info ckpt/
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
import yaml

from clipjob.errors import ClipjobError

ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and convert checkpoints.")

SOURCES = ("auto", "corenet", "openclip", "openai")


def _model_config(sd, resolved: str, layout: str, quick_gelu: bool, overrides: list[str],
                  corenet_config: str | None = None):
    """The full Config of converted weights: the stored one (clipjob), else inferred from the shapes with the
    head counts (which shapes cannot tell) from `--set model.*.heads=N` or the CoreNet YAML; then `--set`."""
    from clipjob import checkpoint as ckpt
    from clipjob.config import resolve, to_dict
    from clipjob.model.convert import infer_model_config

    stored = ckpt.stored_config_yaml(resolved) if layout == "clipjob" else None
    if stored:
        return resolve(yaml.safe_load(stored), None, overrides)
    heads = _given_heads(overrides, corenet_config)
    try:
        model = infer_model_config(sd, "quick_gelu" if quick_gelu else "gelu", heads["vision"], heads["text"])
    except ClipjobError as e:
        raise ClipjobError(f"{resolved}: {e}") from None
    return resolve({"model": to_dict(model)}, None, overrides)


def _given_heads(overrides: list[str], corenet_config: str | None) -> dict[str, int | None]:
    """Head counts given by `--set model.{vision,text}.heads=N`, else by a CoreNet YAML (its ViT mode and
    text n_heads_per_layer), else None."""
    from clipjob.config import overrides_dict

    heads: dict[str, int | None] = {"vision": None, "text": None}
    if corenet_config:
        from clipjob.config import load_yaml
        from clipjob.config_import import VIT_MODES, flatten

        flat = flatten(load_yaml(corenet_config))
        mode = flat.get("model.classification.vit.mode") or \
            ("base" if flat.get("model.classification.name") == "vit" else None)  # CoreNet's default mode
        if mode is not None and mode not in VIT_MODES:
            raise ClipjobError(f"{corenet_config}: model.classification.vit.mode {mode!r} is not one of {', '.join(VIT_MODES)}")
        heads = {"vision": VIT_MODES[mode][2] if mode else None,
                 "text": flat.get("model.text.transformer.n_heads_per_layer")}
    given = overrides_dict(overrides)
    for tower in heads:
        value = given.get("model", {}).get(tower, {}).get("heads")
        if value is not None:
            heads[tower] = int(value)
    return heads


MINILM = "MiniLM text (width 384, 6 layers, 12 heads, pretrained all-MiniLM-L6-v2)"  # fixed by its weights


def describe_model(m) -> str:
    v, t = m.vision, m.text
    stem = "conv stem" if v.family == "corenet" else f"patch {v.patch_size}"
    words = f", projection reads layers {'+'.join(map(str, t.pool_layers))}" if t.pool_layers else ""
    text = MINILM.replace(")", f"{words})") if t.kind == "minilm" else (f"{t.kind} text (width {t.width}, {t.layers} layers, {t.heads} heads, "
                                              f"context {t.context_length}, {t.act})")
    if v.family == "efficientnet-lite0":
        head = f"MLP head {v.head_hidden} wide" if v.head_hidden else "linear head"
        head = f"{m.ensemble} x {head.replace('head', 'heads')}" if m.ensemble > 1 else head
        pool = {"head": "", "stages": ", on every stage's pooled output",
                "stages+max": ", on every stage's mean- and max-pooled output"}[v.pool]
        image = f"EfficientNet-Lite0 ({'frozen' if v.freeze else 'tuned'} ImageNet trunk, {head}{pool}, {v.image_size}px)"
    else:
        image = (f"ResNet (stem width {v.width}, blocks {'-'.join(map(str, v.resnet_layers))}, {v.heads} pool heads, "
                 f"{v.image_size}px)" if v.family == "resnet" else
                 f"{v.family} ViT (width {v.width}, {v.layers} layers, {v.heads} heads, {stem}, {v.image_size}px, {v.act})")
    return f"{image} + {text}, embed {m.embed_dim}{', RangeAugment' if m.range_augment else ''}"


def convert_checkpoint(src: str, dst: str, source: str = "auto", overrides: list[str] = (),
                       force: bool = False, corenet_config: str | None = None) -> str:
    """Read `src` (any supported layout), check it against its architecture, write clipjob weights to `dst`."""
    from clipjob import checkpoint as ckpt
    from clipjob import fs
    from clipjob.config import to_yaml
    from clipjob.model.convert import count_parameters, detect_layout, fit_to_config, to_clipjob

    if source not in SOURCES:
        raise ClipjobError(f"--from {source!r}: expected one of {', '.join(SOURCES)}")
    target = dst if dst.endswith(".safetensors") else fs.join(dst, "model.safetensors")
    if fs.exists(target) and not force:
        raise ClipjobError(f"{dst}: already holds a checkpoint; pass --force to overwrite it")
    raw, resolved = ckpt.read_state_dict(src)
    layout = detect_layout(raw)
    try:
        sd = to_clipjob(raw, "openclip" if source == "openai" else source)
    except ClipjobError as e:
        raise ClipjobError(f"{resolved}: {e}") from None
    cfg = _model_config(sd, resolved, layout, source == "openai", list(overrides), corenet_config)
    sd = fit_to_config(sd, cfg.model, resolved)
    sd = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}
    ckpt.write_converted(dst, sd, to_yaml(cfg), {"source": src, "layout": layout, "step": None})
    n = count_parameters(cfg.model)
    note = ""
    if layout == "openclip" and source == "auto":
        note = " (assumed GELU; use --from openai for OpenAI's QuickGELU weights)"
    return f"wrote {dst}: {layout} -> clipjob, {describe_model(cfg.model)}, {n:,} parameters{note}"


def checkpoint_info(url: str, overrides: list[str] = ()) -> dict:
    """What `ckpt info` prints; for a run dir, of its newest committed step that loads (newer ones that do
    not are skipped with a warning naming them)."""
    from clipjob import checkpoint as ckpt

    if ckpt.is_run_dir(url):
        return ckpt.load_newest(url, lambda u: _checkpoint_info(u, overrides))[1]
    return _checkpoint_info(url, overrides)


def _checkpoint_info(url: str, overrides: list[str] = ()) -> dict:
    from clipjob import checkpoint as ckpt
    from clipjob.config import to_dict
    from clipjob.model.convert import count_parameters, detect_layout, to_clipjob

    raw, resolved = ckpt.read_state_dict(url)
    layout = detect_layout(raw)
    sd = to_clipjob(raw)
    cfg = _model_config(sd, resolved, layout, False, list(overrides))
    return {"checkpoint": resolved, "layout": layout, "architecture": describe_model(cfg.model),
            "parameters": count_parameters(cfg.model), "step": ckpt.stored_step(resolved),
            "tensors": len(raw), "model": to_dict(cfg.model)}


Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override the inferred model config: model.key=value")]


@ckpt_app.command("convert")
def ckpt_convert(
    src: Annotated[str, typer.Argument(help="Source weights: file, step folder or run dir (any fsspec URL)")],
    dst: Annotated[str, typer.Argument(help="Output: a step folder (weights + config.yaml) or a .safetensors file")],
    from_: Annotated[str, typer.Option("--from", help="Source layout: corenet, openclip, openai (QuickGELU) or auto")] = "auto",
    set_: Sets = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing checkpoint at DST")] = False,
    corenet_config: Annotated[Optional[str], typer.Option(help="The CoreNet YAML the weights were trained with "
                                                                 "(head counts; any fsspec URL)")] = None,
) -> None:
    """Convert CoreNet / OpenCLIP / OpenAI weights into a clipjob checkpoint (loaded strictly, shapes checked)."""
    typer.echo(convert_checkpoint(src, dst, from_, list(set_ or []), force, corenet_config))


@ckpt_app.command("info")
def ckpt_info(
    url: Annotated[str, typer.Argument(help="Checkpoint: file, step folder or run dir (any fsspec URL)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    set_: Sets = None,
) -> None:
    """Layout, architecture, parameter count and step of a checkpoint."""
    info = checkpoint_info(url, list(set_ or []))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key in ("checkpoint", "layout", "architecture", "parameters", "step"):
        value = info[key]
        typer.echo(f"{key}: {value:,}" if key == "parameters" else f"{key}: {'-' if value is None else value}")
