"""Bad data: each kind is skipped and counted by reason, training goes on (the loader in-process; `clipjob
train` through bad data and a mostly-bad dataset's exit code 2: tests/integration/test_bad_data_train.py)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from clipjob.config import DataConfig
from clipjob.data.pipeline import build_train_loader
from shard_samples import bomb_png, good, png, raw_tar, write


def bad_counts(spec: str, batches: int = 6) -> Counter:
    """Run the real loader (in-process) for a few batches: they must come, with full shapes."""
    tok = lambda caps: torch.zeros(len(caps), 4, dtype=torch.long)  # noqa: E731
    data = DataConfig(train=spec, num_workers=0, shuffle_buffer=4, rrc_scale=(0.9, 1.0))
    it = iter(build_train_loader(data, batch_size=4, image_size=16, tokenizer=tok, seed=0, rank=0, start_step=0))
    total: Counter = Counter()
    for _ in range(batches):
        b = next(it)
        assert b.images.shape == (4, 3, 16, 16)
        total.update(b.bad)
    return total


def with_one_bad(tmp_path: Path, bad_sample: dict) -> str:
    return write(tmp_path / "ds", [good(i) for i in range(3)] + [bad_sample] + [good(i) for i in range(3, 6)])


def test_should_skip_and_count_a_truncated_tar(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(8)] + [{"png": os.urandom(20_000), "txt": "big"}])
    shard = tmp_path / "ds" / "s-000000.tar"
    shard.write_bytes(shard.read_bytes()[:-15_000])  # cut inside the last sample's image
    assert bad_counts(d)["truncated_shard"] > 0  # and the 8 samples before the cut still make batches


def test_should_skip_and_count_a_corrupt_image(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"jpg": b"\xff\xd8\xff garbage", "txt": "x"}))["corrupt_image"] > 0


def test_should_skip_and_count_a_missing_caption(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png()}))["missing_caption"] > 0


def test_should_skip_and_count_an_empty_caption(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png(), "txt": " \n\t "}))["empty_caption"] > 0


def test_should_skip_and_count_a_caption_that_is_not_utf8(tmp_path):
    assert bad_counts(with_one_bad(tmp_path, {"png": png(), "txt": b"caf\xe9 cr\xe8me"}))["caption_not_utf8"] > 0


def test_should_skip_and_count_a_decompression_bomb(tmp_path):
    bomb = bomb_png()
    assert len(bomb) < 200  # small on disk, 3.6 gigapixels declared
    assert bad_counts(with_one_bad(tmp_path, {"png": bomb, "txt": "bomb"}))["image_too_large"] > 0


def test_should_skip_and_count_a_zero_byte_shard(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").write_bytes(b"")
    assert bad_counts(d)["empty_shard"] > 0


def test_should_skip_and_count_a_missing_shard(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").unlink()  # still listed in manifest.json
    assert bad_counts(d)["missing_shard"] > 0


def test_should_skip_and_count_a_file_that_is_not_a_tar_as_unreadable(tmp_path):
    d = write(tmp_path / "ds", [good(i) for i in range(6)], per_shard=3)
    (tmp_path / "ds" / "s-000001.tar").write_bytes(b"<html><body>Access Denied</body></html>\n" * 30)
    bad = bad_counts(d)
    assert bad["unreadable_shard"] > 0 and "truncated_shard" not in bad


def test_should_train_one_copy_of_a_duplicate_key_and_count_the_others(tmp_path):
    """Shard keys a, b, a, c, c: the separated and the adjacent repeat are dropped, so a draw of the shard
    gives 3 samples (was 4: one trained twice, one merged into its previous copy)."""
    (tmp_path / "ds").mkdir()
    members = [(f"{k}.{ext}", data) for k, cap in [("a", "first a"), ("b", "b"), ("a", "second a"), ("c", "first c"),
                                                   ("c", "second c")]
               for ext, data in [("png", png()), ("txt", cap.encode())]]
    raw_tar(tmp_path / "ds" / "s-000000.tar", members)
    captions: Counter = Counter()

    def tok(caps: list[str]) -> torch.Tensor:
        captions.update(caps)
        return torch.zeros(len(caps), 4, dtype=torch.long)

    data = DataConfig(train=str(tmp_path / "ds"), num_workers=0, shuffle_buffer=0, rrc_scale=(0.9, 1.0))
    it = iter(build_train_loader(data, batch_size=3, image_size=16, tokenizer=tok, seed=0, rank=0, start_step=0))
    bad: Counter = Counter()
    for _ in range(4):  # one batch per draw of the shard
        bad.update(next(it).bad)
    # 2 repeats per draw; the 4th draw's second c comes after its batch was full, so the next batch counts it
    assert captions == {"first a": 4, "b": 4, "first c": 4} and bad == {"duplicate_key": 2 * 4 - 1}
