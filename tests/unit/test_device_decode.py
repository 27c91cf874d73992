"""data/device_decode.py (data.decode=gpu) on the CPU: the same images as decode=cpu, the same crop boxes for a
seed, mixed PNG/JPEG batches in order, corrupt JPEGs replaced and counted, the config key (a real `clipjob train`
with data.decode=gpu: tests/integration/test_device_decode_train.py).

Tolerance of decode=gpu vs decode=cpu (TOL): both paths crop the same box (same torch RNG calls on the same
declared size; the test images are smaller than 2 x S on their shorter side, so the CPU path's draft mode
decodes at full size) and resize it with the same kernel; only the JPEG decoders differ (torchvision's
libjpeg-turbo here, nvjpeg on CUDA; PIL's libjpeg-turbo on the CPU path). JPEG conformance (ISO 10918-2, the
IEEE 1180 IDCT accuracy test) allows each decoder a peak error of 1 per Y/Cb/Cr sample, so two decoders differ by
<= 2; chroma upsampling is a convex combination, rounded: <= 3; YCbCr -> RGB adds <= 1.772 x 3 (B from Cb) + 1
(rounding) to Y's 2: <= 8.3, i.e. 8 in integers; the antialiased bilinear resize is a convex combination,
rounded: <= 9. (Both CPU decoders are libjpeg-turbo's exact integer IDCT: 0 is what they give here.)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from clipjob.config import DataConfig
from clipjob.data.decode import decode_image
from clipjob.data.device_decode import materialize, plan_jpeg
from clipjob.data.pipeline import build_train_loader
from clipjob.data.transforms import Augment, RandomResizedCrop
from clipjob.errors import ConfigError
from shard_samples import jpeg, png, write

TOL = 9  # grey levels: the derivation is in the module docstring
SIZE = 48  # the batches' image size; the test JPEGs' shorter sides stay below 2 x SIZE (no draft reduction)


def undefined_quant_table(data: bytes) -> bytes:
    """The JPEG with its frame's components pointing at quantization table 3, which it does not define: the
    header parses (size, mode), every decoder refuses the pixels."""
    out, i = bytearray(data), 2
    while out[i + 1] != 0xC0:  # walk the marker segments to the baseline frame header
        i += 2 + int.from_bytes(out[i + 2:i + 4], "big")
    for c in range(out[i + 9]):
        out[i + 12 + 3 * c] = 3
    return bytes(out)


def tokens(captions: list[str]) -> torch.Tensor:
    """Each caption "... <n>" as the token row [n]: a batch's rows say which samples they hold."""
    return torch.tensor([[int(c.split()[-1])] for c in captions])


def batches(data_dir: str, decode: str, n: int, seed: int = 0, batch_size: int = 8, **data) -> list:
    data = {"shuffle_buffer": 4, **data}
    cfg = DataConfig(train=data_dir, num_workers=0, rrc_scale=(0.5, 1.0), decode=decode, **data)
    it = iter(build_train_loader(cfg, batch_size=batch_size, image_size=SIZE, tokenizer=tokens, seed=seed, rank=0,
                                 start_step=0))
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """JPEGs (a third greyscale) with a PNG every 4th sample."""
    samples = [{"png": png(40), "txt": f"png {i}"} if i % 4 == 0 else
               {"jpg": jpeg(i, "L" if i % 3 == 0 else "RGB"), "txt": f"jpeg {i}"} for i in range(48)]
    return write(tmp_path_factory.mktemp("mixed"), samples)


def test_should_give_the_images_of_decode_cpu_within_the_decoders_tolerance(mixed):
    cpu, gpu = batches(mixed, "cpu", 4), batches(mixed, "gpu", 4)
    assert all(b.jpegs is None for b in cpu) and all(b.jpegs is not None for b in gpu)
    for a, b in zip(cpu, gpu):
        got = materialize(b, "cpu")
        assert got.images.shape == a.images.shape == (8, 3, SIZE, SIZE) and got.images.dtype == torch.uint8
        assert torch.equal(got.tokens, a.tokens)
        assert (got.images.int() - a.images.int()).abs().max() <= TOL
    assert decode_image({"jpg": jpeg(1)}, SIZE).size == Image.open(io.BytesIO(jpeg(1))).size  # no draft here


def test_should_draw_the_crop_boxes_of_the_cpu_transform_for_the_same_seed(mixed):
    files = [jpeg(i) for i in range(300)]
    crop = RandomResizedCrop(SIZE, (0.5, 1.0))
    torch.manual_seed(7)
    planned = [plan_jpeg({"jpg": f}, crop)[1] for f in files]
    torch.manual_seed(7)  # torchvision's crop on the decoded images draws the same boxes
    reference = T.RandomResizedCrop(SIZE, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3))
    drawn = [tuple(reference.make_params([torch.from_numpy(np.array(decode_image({"jpg": f}, SIZE)))
                                          .permute(2, 0, 1)]).values()) for f in files]
    assert planned == drawn
    for f, (top, left, h, w) in zip(files, planned):  # scale 0.5..1 of the area, ratio 3/4..4/3, up to rounding
        W, H = Image.open(io.BytesIO(f)).size
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        assert (w + 0.5) * (h + 0.5) >= 0.5 * W * H and (w - 0.5) * (h - 0.5) <= W * H
    # the loader: the same seed gives the same boxes, another seed others
    one, again, other = (batches(mixed, "gpu", 2, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a.jpegs.boxes, b.jpegs.boxes) for a, b in zip(one, again))
    assert not all(torch.equal(a.jpegs.boxes, b.jpegs.boxes) for a, b in zip(one, other))


def test_should_keep_the_order_and_size_of_a_mixed_png_and_jpeg_batch(mixed):
    for b in batches(mixed, "gpu", 3):
        rows = b.jpegs.rows.tolist()
        ids = b.tokens[:, 0].tolist()
        assert rows == [k for k, i in enumerate(ids) if i % 4]  # the JPEGs go encoded, the PNGs decoded
        assert b.images.shape == (8 - len(rows), 3, SIZE, SIZE)
        got = materialize(b, "cpu")
        assert got.images.shape == (8, 3, SIZE, SIZE) and got.tokens[:, 0].tolist() == ids
        for k in range(8):  # PNG rows hold the worker's images; JPEG rows a picture, not the empty buffer
            if k not in rows:
                assert torch.equal(got.images[k], b.images[[r for r in range(8) if r not in rows].index(k)])


def test_should_replace_and_count_a_corrupt_jpeg_that_passes_the_header_check(tmp_path):
    bad = undefined_quant_table(jpeg(5))
    assert plan_jpeg({"jpg": bad}, RandomResizedCrop(SIZE, (0.5, 1.0))) is not None  # it goes to the device
    d = write(tmp_path / "ds", [{"jpg": bad if i == 5 else jpeg(i), "txt": f"jpeg {i}"} for i in range(8)])
    (b,) = batches(d, "gpu", 1, shuffle_buffer=1)  # in shard order: the corrupt image is row 5
    got = materialize(b, "cpu")
    assert got.images.shape == (8, 3, SIZE, SIZE) and got.bad.get("corrupt_image") == 1 and got.replaced == 1
    assert torch.equal(got.images[5], got.images[4]) and torch.equal(got.tokens[5], got.tokens[4])
    assert got.tokens[:, 0].tolist() == [0, 1, 2, 3, 4, 4, 6, 7]


def test_should_augment_on_the_device_from_the_batch_seed_and_leave_the_trainer_rng_alone(mixed):
    aug = {"color_jitter": 0.4, "grayscale_p": 0.5, "outline_p": 0.5, "background_p": 0.5}
    (b,) = batches(mixed, "gpu", 1, **aug)
    assert b.jpegs.aug_seed is not None
    torch.manual_seed(0)
    one = materialize(b, "cpu", Augment(**aug))
    after = torch.rand(4)
    torch.manual_seed(0)
    plain = materialize(b, "cpu")
    assert torch.equal(torch.rand(4), after)  # the trainer's RNG does not see the augmentations' draws
    assert torch.equal(materialize(b, "cpu", Augment(**aug)).images, one.images)  # the batch decides them
    assert not torch.equal(one.images, plain.images)


def test_should_refuse_an_unknown_decode_value_naming_the_key(tiny_cfg):
    assert tiny_cfg("data.decode=gpu").data.decode == "gpu"
    with pytest.raises(ConfigError, match=r"data\.decode: 'nvjpeg' is not one of cpu, gpu"):
        tiny_cfg("data.decode=nvjpeg")


def test_should_decode_each_batch_at_its_multiscale_size(mixed):
    cfg = DataConfig(train=mixed, num_workers=0, shuffle_buffer=4, rrc_scale=(0.5, 1.0), decode="gpu")
    it = iter(build_train_loader(cfg, batch_size=8, image_size=SIZE, tokenizer=tokens, seed=0, rank=0, start_step=0,
                                 batch_schedule=lambda step: (32, 12) if step % 2 else (SIZE, 8)))
    shapes = [tuple(materialize(next(it), "cpu").images.shape) for _ in range(3)]
    assert shapes == [(8, 3, SIZE, SIZE), (12, 3, 32, 32), (8, 3, SIZE, SIZE)]
