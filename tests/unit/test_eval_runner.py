"""eval/runner.py: which settings an evaluation takes from the checkpoint's config; retrieval through the
runner on written shards with the tiny model; --data specs checked before any model is loaded."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from clipjob.config import build_config
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError
from clipjob.eval import runner
from clipjob.model import build_model


def test_should_take_the_eval_batch_size_from_the_config_unless_the_command_line_gives_one(monkeypatch):
    seen = []
    monkeypatch.setattr(runner, "build_eval_set", lambda *a, **k: None)
    monkeypatch.setattr(runner, "format_result", lambda r: "")
    monkeypatch.setattr(runner, "evaluate", lambda model, tok, es, device, batch_size, *a, **k: seen.append(batch_size) or {})
    cfg = build_config("tiny-cpu", None, ["eval.batch_size=7"])
    model = torch.nn.Linear(1, 1)
    runner.evaluate_model(model, cfg, "run/checkpoints/step-00000003", ["folder:x"])
    runner.evaluate_model(model, cfg, "run/checkpoints/step-00000003", ["folder:x"], batch_size=5)
    assert seen == [7, 5]


def _emoji_layout(root: Path, captions: list[str], sub: str = "heldout") -> None:
    """An emoji-heldout layout (heldout/ shards, heldout_concepts.json): one picture per caption, in 2 shards.
    A picture's colour is a function of its caption, so a caption written twice has the same picture."""
    names = sorted(set(captions))
    with ShardWriter(str(root / sub), prefix=sub, max_samples=(len(captions) + 1) // 2) as w:
        for i, text in enumerate(captions):
            buf = io.BytesIO()
            rng = random.Random(text)
            Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
            w.write(f"k{i:03d}", {"png": buf.getvalue(), "txt": text, "json": {"concept": text}})
    (root / "heldout_concepts.json").write_text(json.dumps(names))


def test_should_give_zero_shot_top1_and_top5_as_image_to_text_recall_when_captions_are_the_class_names(
        tmp_path, tiny_cfg, capsys):
    """With one picture per class, its caption the class name and the single template '{}', the class prompts
    are the captions: image->text recall@1/@5 must equal top-1/top-5, and the same shards read as a captions:
    set give the same recall."""
    _emoji_layout(tmp_path, [f"thing {i}" for i in range(12)])
    (tmp_path / "templates.txt").write_text("{}\n")
    cfg = tiny_cfg("model.text.context_length=16")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    emoji, captions = runner.evaluate_model(
        model, cfg, "run/checkpoints/step-00000003", [f"emoji-heldout:{tmp_path}", f"captions:{tmp_path}/heldout"],
        batch_size=5, workers=0, templates=str(tmp_path / "templates.txt"), retrieval=True)
    assert (emoji["i2t_r1"], emoji["i2t_r5"]) == pytest.approx((emoji["top1"], emoji["top5"]))
    assert 0 < emoji["i2t_r5"] < 100 and emoji["i2t_r1"] <= emoji["i2t_r5"] <= emoji["i2t_r10"]
    assert emoji["images"] == captions["images"] == emoji["captions"] == 12
    assert {k: v for k, v in captions.items() if k.startswith(("i2t", "t2i"))} == \
        {k: v for k, v in emoji.items() if k.startswith(("i2t", "t2i"))} and "top1" not in captions
    lines = capsys.readouterr().out.splitlines()
    assert "top-1" in lines[0] and "retrieval R@1/5/10 image->text" in lines[0] and lines[1].startswith("top1=")
    assert lines[3].startswith(f"captions:{tmp_path}/heldout: retrieval R@1/5/10 image->text ")
    assert lines[3].endswith("over 12 images, 12 distinct captions")


def test_should_score_held_out_concepts_in_every_style_on_the_held_out_classes(tmp_path, tiny_cfg, capsys):
    """emoji-heldout-styles: reads heldout_styles/ with heldout_concepts.json's classes. Written here as the
    held-out pictures twice over (two "styles" drawing alike), so it must score exactly as
    emoji-heldout on twice the images; a label taken from the wrong list or by position would not."""
    names = [f"thing {i}" for i in range(10)]
    _emoji_layout(tmp_path, names)
    _emoji_layout(tmp_path, names + names, sub="heldout_styles")
    cfg = tiny_cfg("model.text.context_length=16")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    one, every = runner.evaluate_model(model, cfg, "run", [f"emoji-heldout:{tmp_path}", f"emoji-heldout-styles:{tmp_path}"],
                                       batch_size=32, workers=0)
    assert (every["images"], every["classes"]) == (2 * one["images"], one["classes"]) == (20, 10)
    assert (every["top1"], every["top5"]) == pytest.approx((one["top1"], one["top5"]))
    assert 0 < one["top5"] < 100  # an untrained model: neither all nor nothing, so a wrong label would show
    capsys.readouterr()
    (tmp_path / "old").mkdir()
    _emoji_layout(tmp_path / "old", names)  # a dataset built before heldout_styles/ existed
    with pytest.raises(ClipjobError, match=r"heldout_styles/manifest.json not found: not a `clipjob data emoji` "
                                           r"dataset, or one built before clipjob wrote heldout_styles/ \(rebuild it\)"):
        runner.evaluate_model(model, cfg, "run", [f"emoji-heldout-styles:{tmp_path / 'old'}"], workers=0)


def test_should_embed_a_shared_caption_once_when_samples_share_it(tmp_path, tiny_cfg):
    _emoji_layout(tmp_path, ["a red square", "a blue square", "a red  square", "A red square", "a green square"])
    cfg = tiny_cfg("model.text.context_length=16")
    model = build_model(cfg.model).eval()
    r, = runner.evaluate_model(model, cfg, "run", [f"captions:{tmp_path}/heldout"], batch_size=2, workers=0)
    assert (r["images"], r["captions"]) == (5, 3)  # whitespace and case: the same caption to the model
    assert r["t2i_r5"] == 100.0 and r["step"] is None


def test_should_refuse_retrieval_before_loading_a_model_when_a_set_has_no_captions(tmp_path):
    with pytest.raises(ClipjobError, match=r"--retrieval: --data 'folder:x' has no captions"):
        runner.run_zeroshot(str(tmp_path / "no-such-checkpoint"), ["emoji-heldout:d", "folder:x"], retrieval=True)
    with pytest.raises(ClipjobError, match=r"--data 'flickr:x': expected emoji-heldout:DIR"):
        runner.check_data(["flickr:x"])
    runner.check_data(["folder:x", "imagenet:y"])  # no retrieval asked: classification sets are fine
