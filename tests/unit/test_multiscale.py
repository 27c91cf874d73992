"""data/multiscale.py: CoreNet's sizes and batches, the same choice everywhere for a step, and the loader
honouring the schedule in step order across DataLoader workers."""

from __future__ import annotations

import io
import pickle
from collections import Counter

import pytest
import torch
from PIL import Image

from clipjob.config_import import multiscale_sizes
from clipjob.data.multiscale import MultiScaleSchedule, build_schedule


def test_should_match_corenets_sizes_and_batches_when_base_224_and_batch_256():
    sizes = multiscale_sizes(224, 160, 320, 5, 32)  # what `config from-corenet` imports for CoreNet's ViT-B/16
    assert sizes == [160, 192, 224, 256, 288, 320]
    s = build_schedule(sizes, 224, 256, seed=0)
    assert [s.batch_for(x) for x in sizes] == [501, 348, 256, 196, 154, 125]


def test_should_choose_the_same_shape_for_a_step_when_built_anywhere():
    a = build_schedule([160, 224, 320], 224, 64, seed=5)
    b = pickle.loads(pickle.dumps(build_schedule([320, 160, 224], 224, 64, seed=5)))  # another rank / worker
    assert [a(step) for step in range(200)] == [b(step) for step in range(200)]
    assert [a(step) for step in range(50)] != [build_schedule([160, 224, 320], 224, 64, seed=6)(s) for s in range(50)]


def test_should_visit_every_size_when_running_long_enough():
    s = build_schedule([16, 24, 40], 32, 8, seed=0)
    counts = Counter(s(step)[0] for step in range(3000))
    assert set(counts) == {16, 24, 32, 40}
    assert all(700 < c < 800 for c in counts.values())  # uniform over the sizes
    assert {s(step) for step in range(100)} == {(16, 32), (24, 14), (32, 8), (40, 5)}


def _tokens(captions: list[str]) -> torch.Tensor:
    return torch.zeros(len(captions), 4, dtype=torch.long)


@pytest.mark.parametrize("workers", [0, 2])
def test_should_yield_each_steps_shape_in_order_when_the_loader_uses_the_schedule(tmp_path, workers):
    from clipjob.config import DataConfig
    from clipjob.data.pipeline import build_train_loader
    from clipjob.datasets.writer import ShardWriter

    with ShardWriter(str(tmp_path), prefix="t", max_samples=20) as w:
        for i in range(60):
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), (i * 4, 10, 200)).save(buf, format="PNG")
            w.write(f"k{i:04d}", {"png": buf.getvalue(), "txt": f"sample {i}"})
    schedule = MultiScaleSchedule((16, 24, 32), 24, 6, seed=3)
    start = 7
    data = DataConfig(train=str(tmp_path), num_workers=workers, shuffle_buffer=10, rrc_scale=(0.8, 1.0))
    loader = build_train_loader(data, batch_size=6, image_size=24, tokenizer=_tokens, seed=0, rank=0,
                                start_step=start, batch_schedule=schedule, prefetch_factor=2)
    got = []
    for i, batch in zip(range(8), loader):
        got.append((batch.images.shape[-1], batch.images.shape[0]))
        assert batch.images.shape[-2] == batch.images.shape[-1] and batch.tokens.shape[0] == batch.images.shape[0]
    assert got == [schedule(start + i) for i in range(8)]
    assert len(set(got)) > 1
