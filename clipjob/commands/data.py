"""`clipjob data ...`: build, inspect and generate datasets."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated

import typer

from clipjob.errors import ClipjobError

data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str, key: str = "--shard-size") -> int:
    """'256MB' -> 256000000; '1GiB' -> 1073741824; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ClipjobError(f"{key} {text!r}: expected a size such as 256MB, 1GiB or 500000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@data_app.command("emoji")
def data_emoji(out: Annotated[str, typer.Option(help="Output directory")],
               seed: Annotated[int, typer.Option(help="Split/caption seed")] = 0,
               heldout_fraction: Annotated[float, typer.Option(help="Fraction of concepts held out")] = 0.1,
               styles: Annotated[str, typer.Option(help="Comma-separated styles to use: twemoji, openmoji, fluent, emojione, emojione-v1, emojione-mono, fxemoji, streamline (the last six from npm, fetched once), glyph, icons, symbols, pictograms (npm)")] = "twemoji,openmoji,glyph",
               leave_out: Annotated[str, typer.Option(help="Emoji style kept out of training and evaluated under OUT/unseen: any emoji style above, or none")] = "openmoji",
               captions_per_concept: Annotated[int, typer.Option(help="Training samples per concept and style")] = 4,
               named_captions_per_concept: Annotated[int, typer.Option(help="Training samples per concept of the icons, symbols and pictograms (-1: as --captions-per-concept)")] = -1) -> None:
    """Build the embedded many-style dataset (emoji in up to eight emoji styles and font glyphs, named icons,
    symbols and pictograms) as webdataset shards, with held-out concepts and a left-out style for zero-shot
    evaluation."""
    from clipjob.datasets.emoji_build import build_emoji_dataset

    summary = build_emoji_dataset(out, seed=seed, heldout_fraction=heldout_fraction, leave_out=leave_out,
                                  styles=tuple(s.strip() for s in styles.split(",") if s.strip()),
                                  captions_per_concept=captions_per_concept,
                                  named_captions_per_concept=None if named_captions_per_concept < 0 else named_captions_per_concept)
    typer.echo(json.dumps(summary))


@data_app.command("build")
def data_build(
    src: Annotated[str, typer.Argument(help="Image folder (sidecar .txt captions), CSV/TSV/parquet table, or CoreNet tar dataset folder; any fsspec URL")],
    out: Annotated[str, typer.Option(help="Output directory URL (local path, s3://bucket/prefix, ...)")],
    kind: Annotated[str, typer.Option("--from", help="Input kind: auto, folder, table or corenet")] = "auto",
    shard_size: Annotated[str, typer.Option(help="Target shard size (e.g. 256MB, 1GiB)")] = "256MB",
    samples_per_shard: Annotated[int, typer.Option(help="Samples per shard (overrides --shard-size)")] = 0,
    max_size: Annotated[int, typer.Option(help="Downscale images whose shorter side exceeds this many pixels (0 = keep)")] = 0,
    dedup: Annotated[bool, typer.Option(help="Drop images whose bytes duplicate an earlier one")] = True,
    workers: Annotated[int, typer.Option(help="Worker processes (default: CPU count)")] = 0,
    prefix: Annotated[str, typer.Option(help="Shard name prefix: PREFIX-000000.tar")] = "shard",
    image_column: Annotated[str, typer.Option(help="Table column with the image path or URL (default: guessed)")] = "",
    caption_column: Annotated[str, typer.Option(help="Table column with the caption (default: guessed)")] = "",
    jpeg_quality: Annotated[int, typer.Option(help="JPEG quality of re-encoded (resized) images")] = 90,
    progress: Annotated[bool, typer.Option(help="Show progress: a bar on a terminal, else a line every 30 s")] = True,
) -> None:
    """Write webdataset shards + manifest.json. Rerun the same command to finish a build that crashed."""
    from clipjob.datasets.build import BuildOptions, build_shards

    if samples_per_shard < 0 or max_size < 0 or workers < 0 or not 1 <= jpeg_quality <= 100:
        raise ClipjobError("--samples-per-shard, --max-size and --workers must be >= 0, --jpeg-quality in 1..100")
    opts = BuildOptions(out=out, kind=kind, prefix=prefix, shard_size=parse_size(shard_size),
                        samples_per_shard=samples_per_shard, max_size=max_size, dedup=dedup,
                        workers=workers or os.cpu_count() or 1, jpeg_quality=jpeg_quality,
                        image_column=image_column, caption_column=caption_column, progress=progress)
    typer.echo(json.dumps(build_shards(src, opts)))


@data_app.command("inspect")
def data_inspect(
    spec: Annotated[str, typer.Argument(help="Shards: directory/URL with manifest.json, brace pattern, glob, or sources joined with '::'")],
    verify: Annotated[bool, typer.Option(help="Decode every image as training does (finds corrupt pixel data)")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
    max_shards: Annotated[int, typer.Option(help="Only the first N shards (0 = all)")] = 0,
    image_size: Annotated[int, typer.Option(help="Training image size (sets the JPEG draft scale in --verify)")] = 224,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Sample counts, bad samples by reason, caption length and image size statistics."""
    from clipjob.datasets.inspect import format_report, inspect_shards

    report = inspect_shards(spec, verify=verify, workers=max(1, workers), max_shards=max_shards, image_size=image_size)
    typer.echo(json.dumps(report) if as_json else format_report(report))
