"""data.decode=gpu: a batch's JPEG pixels are decoded on the training device, not in the DataLoader workers.

Decoding a JPEG costs ~2 ms of CPU per sample; at 3,000+ samples/s per H200 that is ~8 cores a GPU. With
decode=gpu a worker only parses the header (`open_image`: size, bomb check), draws the RandomResizedCrop box
from the declared size with the very RNG calls the CPU path makes (`plan_jpeg`), and ships the file's bytes and
the box (`EncodedJpegs`). The trainer then decodes all of a batch's JPEGs in one torchvision `decode_jpeg`
call on its device (nvjpeg on CUDA, libjpeg-turbo on the CPU), crops each box, resizes it (bilinear, antialias:
the CPU transform's kernel) and applies the configured augmentations there (`materialize`).

What stays in the workers, decoded as with decode=cpu: PNG/WebP, JPEGs that are not plain RGB or greyscale
(CMYK, YCCK) and JPEGs that do not end in an EOI marker (truncated, or trailing bytes). A JPEG the device
decoder rejects is decoded on the CPU (PIL, full size); one that fails there too is corrupt: it counts as a
`corrupt_image` bad sample and its row takes a copy of the nearest good row before it (image and caption), so
the batch keeps the size every rank agreed on.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import Compose
from torchvision.transforms.v2 import functional as TF

from clipjob.data.decode import IMAGE_KEYS, BadSample, decode_image, open_image
from clipjob.data.transforms import BILINEAR, Augment, augment_steps
from clipjob.errors import ClipjobError

DEVICE_MODES = ("RGB", "L")  # JPEG colour modes decoded on the device; others (CMYK, YCCK) in the worker
EOI = b"\xff\xd9"
# torchvision 0.29 marks torchvision.io's codecs deprecated (in favour of torchcodec); they are what runs here
DEPRECATED = "The image decoding and encoding capabilities of TorchVision"


@dataclass
class EncodedJpegs:
    """The JPEGs of one batch, to be decoded on the trainer's device. Tensors, so the DataLoader moves each
    field through shared memory once (a tensor per image would be one shared-memory segment per image)."""
    rows: torch.Tensor  # (n,) int64: the batch rows these images fill, increasing
    blob: torch.Tensor  # (total,) uint8: the n files back to back
    offsets: torch.Tensor  # (n + 1,) int64: image k is blob[offsets[k]:offsets[k + 1]]
    boxes: torch.Tensor  # (n, 4) int64: (top, left, height, width) of the crop, in full-size pixels
    size: int  # the batch's image size S (multi-scale: this step's)
    aug_seed: int | None = None  # seeds the augmentations on the device (None: none configured)

    @classmethod
    def pack(cls, rows: list[int], files: list[bytes], boxes: list[tuple[int, int, int, int]], size: int,
             aug_seed: int | None) -> EncodedJpegs:
        offsets = [0]
        for f in files:
            offsets.append(offsets[-1] + len(f))
        joined = bytearray(b"".join(files))
        blob = torch.frombuffer(joined, dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        return cls(torch.tensor(rows, dtype=torch.int64), blob, torch.tensor(offsets, dtype=torch.int64),
                   torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), size, aug_seed)

    def files(self) -> list[torch.Tensor]:
        o = self.offsets.tolist()
        return [self.blob[a:b] for a, b in zip(o[:-1], o[1:])]


def plan_jpeg(sample: dict, crop) -> tuple[bytes, tuple[int, int, int, int]] | None:
    """(the JPEG's bytes, its crop box) when the device should decode this sample's image, else None (the
    worker decodes it as with decode=cpu). `crop` is a transforms.RandomResizedCrop: the box is its `box` on the
    declared size, the same torch RNG calls as the CPU path's transform makes on the decoded picture.
    Raises BadSample for what `open_image` refuses (bombs, unparseable headers)."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key not in ("jpg", "jpeg"):
        return None
    data = bytes(sample[key])
    img = open_image(data)
    if img.format != "JPEG" or img.mode not in DEVICE_MODES or not data.endswith(EOI):
        return None
    w, h = img.size
    return data, crop.box(h, w)


def materialize(batch, device: torch.device | str, augment: Augment = Augment()):  # pipeline.Batch -> Batch
    """The batch with all its images on `device` as uint8 (B, 3, S, S), in row order: the worker-decoded rows
    moved there, the JPEG rows decoded, cropped, resized and augmented there. Corrupt JPEGs (rejected by the
    device decoder and by PIL) are counted in `bad["corrupt_image"]` and `replaced`, their rows (image and
    tokens) copied from the nearest good row before them (after, for the first). A batch without JPEGs
    (data.decode=cpu) is only moved."""
    enc = batch.jpegs
    if enc is None:
        return dataclasses.replace(batch, images=batch.images.to(device, non_blocking=True))
    n, s = batch.tokens.shape[0], enc.size
    out = torch.empty((n, 3, s, s), dtype=torch.uint8, device=device)
    in_worker = torch.ones(n, dtype=torch.bool)
    in_worker[enc.rows] = False
    if batch.images.shape[0]:
        out[in_worker.nonzero()[:, 0].to(device)] = batch.images.to(device, non_blocking=True)
    crops = decode_crops(enc, device)
    steps = augment_steps(augment)
    with torch.random.fork_rng(devices=[], enabled=bool(steps)):  # the trainer's own RNG stays as it was
        if steps:
            # the CPU generator alone (torch.manual_seed would reseed the CUDA generators too, outside the fork)
            torch.default_generator.manual_seed(enc.aug_seed if enc.aug_seed is not None else 0)
        ops = Compose(steps) if steps else None
        for row, img in zip(enc.rows.tolist(), crops):
            if img is not None:
                out[row] = ops(img) if ops is not None else img
    corrupt = [row for row, img in zip(enc.rows.tolist(), crops) if img is None]
    if not corrupt:
        return dataclasses.replace(batch, images=out, jpegs=None)
    return _replace_corrupt(batch, out, corrupt)


def decode_crops(enc: EncodedJpegs, device: torch.device | str) -> list[torch.Tensor | None]:
    """Each JPEG decoded on `device` (one batched call; image by image if the batch fails), its box cropped and
    resized to (3, S, S) uint8; None for one that neither the device nor PIL decodes."""
    files = enc.files()
    images = _decode_on(files, device)
    crops: list[torch.Tensor | None] = []
    for data, img, box in zip(files, images, enc.boxes.tolist()):
        if img is None:
            img = _decode_with_pil(data, device)
        if img is None:
            crops.append(None)
            continue
        top, left, h, w = box
        crops.append(TF.resized_crop(img, top, left, h, w, [enc.size, enc.size], interpolation=BILINEAR,
                                     antialias=True))
    return crops


def _decode_on(files: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | None]:
    if not files:
        return []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATED)
        try:
            return list(decode_jpeg(files, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):  # one bad image fails the whole call: find it
            pass
        images: list[torch.Tensor | None] = []
        for f in files:
            try:
                images.append(decode_jpeg(f, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                images.append(None)
    return images


def _decode_with_pil(data: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """The CPU decoder of data.decode=cpu, at full size (the box was drawn on the declared size)."""
    try:
        img = decode_image({"jpg": data.numpy().tobytes()}, 0, draft=False)
    except BadSample:
        return None
    return TF.pil_to_tensor(img).to(device)


def _replace_corrupt(batch, out: torch.Tensor, corrupt: list[int]):
    bad_rows = set(corrupt)
    good = [r for r in range(out.shape[0]) if r not in bad_rows]
    if not good:
        raise ClipjobError(f"data.train: none of a batch's {out.shape[0]} images decodes ({len(corrupt)} corrupt "
                           f"JPEGs); check the shards with `clipjob data inspect`")
    tokens = batch.tokens.clone()
    groups = None if batch.groups is None else batch.groups.clone()
    for row in corrupt:
        src = max((r for r in good if r < row), default=good[0])
        out[row] = out[src]
        tokens[row] = tokens[src]
        if groups is not None:
            groups[row] = groups[src]
    bad = dict(batch.bad)
    bad["corrupt_image"] = bad.get("corrupt_image", 0) + len(corrupt)
    return dataclasses.replace(batch, images=out, tokens=tokens, bad=bad, replaced=batch.replaced + len(corrupt),
                               jpegs=None, groups=groups)
