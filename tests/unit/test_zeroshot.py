"""eval/zeroshot.py: progress lines in a pod's log (no terminal) while evaluating; shards read through the
training reader, bad samples and broken shards skipped and counted; a folder's files that do not decode skipped
and counted likewise."""

from __future__ import annotations

import os
import io
import random
from pathlib import Path

import pytest
import torch
from shard_samples import bad_image_files, jpeg
from PIL import Image
from torch.utils.data import TensorDataset

from clipjob.data.transforms import eval_transform
from clipjob.datasets.writer import ShardWriter
from clipjob.errors import ClipjobError
from clipjob.eval.zeroshot import EvalSet, ShardImages, _cls_label, build_eval_set, evaluate, format_result
from clipjob.model import build_model, build_tokenizer


def test_should_print_progress_lines_with_an_eta_when_no_terminal_is_attached(capsys, tiny_cfg):
    cfg = tiny_cfg("model.text.context_length=16")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    es = EvalSet("tiny", ["cat", "dog", "bird"], ["a photo of a {}."],
                 TensorDataset(images, torch.tensor([0, 1, 2] * 4)), size=12)
    r = evaluate(model, build_tokenizer(cfg.model), es, torch.device("cpu"), batch_size=4, workers=0,
                 progress_every_s=0.0)  # pytest's stderr is not a terminal: lines, not a bar
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zero-shot tiny:")]
    assert lines[0].startswith("zero-shot tiny: 4/12 (33.3%), eta ") and lines[-1].startswith("zero-shot tiny: 12/12 (100.0%)")
    assert len(lines) == 3 and r["images"] == 12


def _png(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), tuple(rng.randrange(256) for _ in range(3))).save(buf, "PNG")
    return buf.getvalue()


def _eval_shards(out: Path, samples: list[tuple[str, bytes, int]]) -> list[str]:
    with ShardWriter(str(out), prefix="val", max_samples=len(samples)) as w:
        for key, png, label in samples:
            w.write(key, {"png": png, "cls": str(label)})
    return [str(out / "val-000000.tar")]


@pytest.mark.parametrize("workers", [0, 2])
def test_should_skip_and_count_bad_samples_and_score_the_good_ones_when_eval_shards_are_damaged(tmp_path, workers,
                                                                                                 tiny_cfg):
    """One corrupt image in one shard, another shard cut off in its second sample: both are counted by reason
    (as in training), and top-1/top-5 are those of the good images alone."""
    rng = random.Random(0)
    good = [(f"g{i}", _png(rng), i % 6) for i in range(6)]
    damaged = _eval_shards(tmp_path / "a", [*good[:4], ("bad", b"\x89PNG not an image", 1)])
    cut = _eval_shards(tmp_path / "b", good[4:])
    data = Path(cut[0]).read_bytes()
    Path(cut[0]).write_bytes(data[:data.index(b"g5.cls") + 600])  # in the second sample's last member
    clean = _eval_shards(tmp_path / "clean", good[:5])  # what survives: the cut shard keeps its first sample

    cfg = tiny_cfg("model.text.context_length=16")
    torch.manual_seed(0)
    model, tok = build_model(cfg.model), build_tokenizer(cfg.model)
    names = ["red", "green", "blue", "cyan", "pink", "gray", "black", "white", "olive", "navy", "teal", "plum"]

    def run(urls: list[str]) -> dict:
        images = ShardImages(urls, _cls_label, eval_transform(16, cfg.model.vision.family), 16)
        return evaluate(model, tok, EvalSet("shards", names, ["a {} square."], images), torch.device("cpu"),
                        batch_size=2, workers=workers, progress=False)

    r, want = run(damaged + cut), run(clean)
    assert r["bad_samples_by_reason"] == {"corrupt_image": 1, "truncated_shard": 1} and r["bad_samples"] == 2
    assert (r["images"], r["top1"], r["top5"]) == (want["images"], want["top1"], want["top5"]) and r["images"] == 5
    assert want["bad_samples"] == 0 and "skipped" not in format_result(want)
    assert format_result(r).splitlines()[0].endswith("; skipped: corrupt_image 1, truncated_shard 1")


def _image_folder(root: Path, bad: dict[str, bytes]) -> str:
    """3 classes x 4 good JPEGs; `bad` maps CLASS/NAME to the bytes of a file that is not a decodable image."""
    for c, cls in enumerate(("blue", "green", "red")):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.jpg").write_bytes(jpeg(4 * c + i))
    for name, data in bad.items():
        (root / name).write_bytes(data)
    return str(root)


@pytest.mark.parametrize("workers", [1, 2])
def test_should_skip_and_count_bad_files_and_score_the_good_ones_when_a_folder_has_corrupt_images(tmp_path, workers,
                                                                                                  tiny_cfg):
    """A truncated JPEG, random bytes and a 0-byte file named .jpg, and a decompression bomb, in DataLoader
    workers: counted by reason (the reasons training counts), and top-1/top-5 and the image count are those of
    the same folder without them. Batches of 2 over the sorted files: green's 3 bad files make one batch of
    bad files only and one mixed batch, red's bomb another mixed batch."""
    files = bad_image_files()
    bad = {f"green/4_{n}": data for n, (data, _) in files.items() if n != "bomb.png"}
    bad["red/4_bomb.png"] = files["bomb.png"][0]
    dirty, clean = _image_folder(tmp_path / "dirty", bad), _image_folder(tmp_path / "clean", {})
    cfg = tiny_cfg("model.text.context_length=16")
    torch.manual_seed(0)
    model, tok = build_model(cfg.model), build_tokenizer(cfg.model)

    def run(root: str) -> dict:
        es = build_eval_set(f"folder:{root}", cfg.model.vision.image_size, cfg.model.vision.family)
        return evaluate(model, tok, es, torch.device("cpu"), batch_size=2, workers=workers, progress=False)

    r, want = run(dirty), run(clean)
    assert r["bad_samples_by_reason"] == {"corrupt_image": 3, "image_too_large": 1} and r["bad_samples"] == 4
    assert (r["images"], r["top1"], r["top5"]) == (want["images"], want["top1"], want["top5"]) and r["images"] == 12
    assert want["bad_samples"] == 0 and want["bad_samples_by_reason"] == {}
    assert want["top1"] > 0  # hits to divide: over 16 files instead of 12 images the top-1 would differ
    assert format_result(r).splitlines()[0].endswith("; skipped: corrupt_image 3, image_too_large 1")
    assert "over 3 classes, 12 images" in format_result(r)


def test_should_raise_one_line_naming_the_reasons_when_every_image_of_a_folder_is_bad(tmp_path, tiny_cfg):
    root = tmp_path / "all-bad"
    for cls, name in (("cat", "truncated.jpg"), ("dog", "empty.jpg"), ("dog", "bomb.png")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        (root / cls / name).write_bytes(bad_image_files()[name][0])
    cfg = tiny_cfg("model.text.context_length=16")
    model, tok = build_model(cfg.model), build_tokenizer(cfg.model)
    es = build_eval_set(f"folder:{root}", cfg.model.vision.image_size, cfg.model.vision.family)
    with pytest.raises(ClipjobError) as e:
        evaluate(model, tok, es, torch.device("cpu"), batch_size=2, workers=1, progress=False)
    assert str(e.value) == (f"folder:{root}: no image could be evaluated, all 3 skipped (corrupt_image 2, "
                            "image_too_large 1): check the files")


def test_should_yield_skipped_with_the_reason_when_an_imagenet_folder_holds_a_bad_file(tmp_path):
    """imagenet: folders go through the same FolderImages (full-size decode): a bad file is a counted skip."""
    from clipjob.eval.imagenet_meta import imagenet_wnids

    wnids = imagenet_wnids()
    for w in wnids:
        (tmp_path / w).mkdir()
    (tmp_path / wnids[3] / "a.JPEG").write_bytes(jpeg(0))
    for name, (data, _) in bad_image_files().items():
        (tmp_path / wnids[5] / name).write_bytes(data)
    ds = build_eval_set(f"imagenet:{tmp_path}", 32, "corenet").dataset
    items = [ds[i] for i in range(len(ds))]
    assert items[0][1] == 3 and items[0][0].shape == (3, 32, 32)
    assert [x.reason for x in items[1:]] == [bad_image_files()[n][1] for n in sorted(bad_image_files())]


def test_should_skip_and_count_a_file_that_cannot_be_read_at_all_when_evaluating_a_folder(tmp_path):
    """A dangling link and a folder named like an image are listed but cannot be read: each is skipped as
    unreadable_file, like a corrupt image, and the readable image is still evaluated (as root, permissions
    cannot make a file unreadable, so these two stand in for them)."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.jpg").write_bytes(jpeg(0))
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "cat" / "folder.jpg").mkdir()
    ds = build_eval_set(f"folder:{tmp_path}", 32, "corenet").dataset
    items = {os.path.basename(ds.files[i][0]): ds[i] for i in range(len(ds))}
    assert items["a.jpg"][0].shape == (3, 32, 32)
    assert items["gone.png"].reason == "unreadable_file" and items["folder.jpg"].reason == "unreadable_file", items
