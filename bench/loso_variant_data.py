"""Build a variant of the leave-one-style-out dataset for `bench/loso.py --data DIR`: the same concepts, split,
pictures and sample count as `clipjob data emoji`, with another caption scheme.

    .venv/bin/python bench/loso_variant_data.py --captions eval-templates --out bench/results/tmp/loso-twemoji-evaltemplates
    .venv/bin/python bench/loso.py --styles twemoji --data bench/results/tmp/loso-twemoji-evaltemplates \\
        --set train.steps=1200 --out loso-avx2-64px-1200-b256-evaltemplates

Caption schemes:
- eval-templates: every style's training captions drawn from the zero-shot eval's own prompt templates
  (clipjob.eval.zeroshot.EMOJI_TEMPLATES with the bare name), instead of the dataset's 15 templates with style
  words ("a openmoji picture of ..."), the category phrase and aliases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipjob.datasets import emoji_build  # noqa: E402
from clipjob.eval.zeroshot import EMOJI_TEMPLATES  # noqa: E402

ALL_STYLES = "twemoji,openmoji,fluent,emojione,emojione-v1,emojione-mono,fxemoji,streamline,glyph"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captions", choices=["eval-templates"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--leave-out", default="twemoji")
    ap.add_argument("--styles", default=ALL_STYLES)
    a = ap.parse_args()
    templates = [t.replace("{}", "{n}") for t in EMOJI_TEMPLATES]
    for style in emoji_build.STYLE_TEMPLATES:
        emoji_build.STYLE_TEMPLATES[style] = templates
    summary = emoji_build.build_emoji_dataset(a.out, leave_out=a.leave_out, styles=tuple(a.styles.split(",")))
    print(json.dumps({k: summary[k] for k in ("out", "train_samples", "train_concepts", "heldout_concepts", "seconds")}))


if __name__ == "__main__":
    main()
