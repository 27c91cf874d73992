"""`clipjob data ...`: build, inspect and generate datasets."""

from __future__ import annotations

import json
from typing import Annotated

import typer

data_app = typer.Typer(no_args_is_help=True, help="Build and inspect datasets.")


@data_app.command("emoji")
def data_emoji(out: Annotated[str, typer.Option(help="Output directory")],
               seed: Annotated[int, typer.Option(help="Split/caption seed")] = 0,
               heldout_fraction: Annotated[float, typer.Option(help="Fraction of concepts held out")] = 0.1) -> None:
    """Build the embedded emoji dataset (twemoji images, CC-BY 4.0) as webdataset shards."""
    from clipjob.data.emoji import build_emoji_dataset

    summary = build_emoji_dataset(out, seed=seed, heldout_fraction=heldout_fraction)
    typer.echo(json.dumps(summary))
