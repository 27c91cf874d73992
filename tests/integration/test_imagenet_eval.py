"""ImageNet zero-shot as a user runs it on CoreNet weights, through the real CLI:

    clipjob ckpt convert --from corenet clip_vit.pt ckpt/
    clipjob eval zeroshot --checkpoint ckpt/ --data imagenet:VAL

on a generated ImageFolder with the 1000 real wnid folders (a few holding an image). The expected top-1/top-5
come from the protocol written out in this file: labels = index of the sorted wnid folder, OpenAI class names
in that order, 80 templates, per class normalise-average-renormalise, logits 100 * img @ text, bilinear resize
and [0, 1] input for CoreNet. Each image is placed in the folder of a class of known rank, so the CLI must
print top1 = 33.333 and top5 = 66.667 exactly."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))

from test_convert_corenet import corenet_shapes, random_state  # noqa: E402

from clipjob.errors import ClipjobError  # noqa: E402
from clipjob.eval.imagenet_meta import imagenet_classnames, imagenet_wnids, openai_imagenet_templates  # noqa: E402
from clipjob.eval.runner import load_for_eval  # noqa: E402
from clipjob.eval.zeroshot import build_eval_set  # noqa: E402
from clipjob.model.tokenizer import ClipTokenizer  # noqa: E402

CONTEXT = 16
RANKS = (0, 2, 40)  # image i goes to the class its logits rank at RANKS[i]: top-1 hit, top-5 hit, miss


def clipjob(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "clipjob", *args], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)  # smooth-ish content, like a photo
        buf = io.BytesIO()
        Image.fromarray(small).resize((224, 224), Image.BICUBIC).save(buf, "JPEG", quality=95)
        out.append(buf.getvalue())
    return out


@torch.no_grad()
def protocol_logits(model, jpegs: list[bytes]) -> torch.Tensor:
    """(images, 1000) zero-shot logits, computed the way the protocol is written down."""
    names, templates = imagenet_classnames(), openai_imagenet_templates()
    assert len(names) == 1000 and len(templates) == 80 and names[0] == "tench"
    tokens = ClipTokenizer(CONTEXT)([t.format(c) for c in names for t in templates])
    text = torch.cat([model.encode_text(tokens[i:i + 8000]) for i in range(0, len(tokens), 8000)])
    classifier = F.normalize(F.normalize(text, dim=-1).view(1000, 80, -1).mean(1), dim=-1)  # (1000, E)
    x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
                     for b in jpegs]).float() / 255  # 224x224 already: resize + crop are the identity
    return 100 * model.encode_image(x) @ classifier.T


def ranked_labels(logits: torch.Tensor) -> list[int]:
    labels = []
    for row, rank in zip(logits, RANKS):
        order = row.argsort(descending=True)
        gaps = (row[order[rank]] - row[order[max(rank - 1, 0)]]).abs(), (row[order[rank]] - row[order[rank + 1]]).abs()
        assert rank == 0 or gaps[0] > 1e-3
        assert gaps[1] > 1e-3, "a near tie; change the seed"
        labels.append(int(order[rank]))
    return labels


@pytest.fixture(scope="module")
def imagenet_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagenet")
    sd = random_state(corenet_shapes(dim=128, layers=1, text_dim=16, text_layers=1, embed=32, ctx=CONTEXT, text_ffn=16))
    torch.save(sd, tmp / "clip_vit_tiny.pt")
    convert = clipjob("ckpt", "convert", "--from", "corenet", str(tmp / "clip_vit_tiny.pt"), str(tmp / "ckpt"),
                      "--set", "model.vision.heads=2", "--set", "model.text.heads=1")  # not standard widths: given
    model, cfg, _ = load_for_eval(str(tmp / "ckpt"), device=torch.device("cpu"))
    jpegs = images(len(RANKS))
    labels = ranked_labels(protocol_logits(model, jpegs))
    wnids = imagenet_wnids()
    for w in wnids:
        (tmp / "val" / w).mkdir(parents=True)
    for i, (jpeg, label) in enumerate(zip(jpegs, labels)):
        (tmp / "val" / wnids[label] / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(jpeg)
    return dict(tmp=tmp, convert=convert, cfg=cfg, jpegs=jpegs, labels=labels)


def test_should_reproduce_the_protocol_through_the_cli_on_a_converted_corenet_checkpoint(imagenet_run):
    tmp = imagenet_run["tmp"]
    assert "corenet -> clipjob" in imagenet_run["convert"].stdout
    assert imagenet_run["cfg"].model.vision.family == "corenet"
    r = clipjob("eval", "zeroshot", "--checkpoint", str(tmp / "ckpt"), "--data", f"imagenet:{tmp / 'val'}",
                "--batch-size", "2", "--workers", "0", "--out", str(tmp / "results.json"))
    assert "top1={'zero_shot_image_logits': 33.333}" in r.stdout.splitlines(), r.stdout
    assert "top5={'zero_shot_image_logits': 66.667}" in r.stdout.splitlines(), r.stdout
    (res,) = json.loads((tmp / "results.json").read_text())
    assert (res["images"], res["classes"], res["templates"], res["resolution"]) == (3, 1000, 80, 224)


def test_should_read_imagenet_webdataset_shards_from_any_url(imagenet_run):
    import fsspec

    mem = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, (jpeg, label) in enumerate(zip(imagenet_run["jpegs"], imagenet_run["labels"])):
            for ext, data in (("jpg", jpeg), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"ILSVRC2012_val_{i:08d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    mem.pipe("/inet-val/imagenet-val-000000.tar", buf.getvalue())
    folder = build_eval_set(f"imagenet:{imagenet_run['tmp'] / 'val'}", 224, "corenet")
    for spec in ("imagenet:memory://inet-val/imagenet-val-{000000..000000}.tar", "imagenet:memory://inet-val"):
        shards = build_eval_set(spec, 224, "corenet")
        assert shards.classnames == folder.classnames and len(shards.templates) == 80
        got = sorted(((label, img) for img, label in shards.dataset), key=lambda t: t[0])
        want = sorted(((folder.dataset[i][1], folder.dataset[i][0]) for i in range(len(folder.dataset))), key=lambda t: t[0])
        assert [g[0] for g in got] == [w[0] for w in want] == sorted(imagenet_run["labels"])
        for (_, a), (_, b) in zip(got, want):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("size", [160, 320])
def test_should_preprocess_at_the_requested_resolution(imagenet_run, size):
    es = build_eval_set(f"imagenet:{imagenet_run['tmp'] / 'val'}", size, "corenet")
    img, _ = es.dataset[0]
    assert img.shape == (3, size, size) and img.dtype == torch.uint8 and img.max() > 0  # float on the device


def test_should_decode_large_jpegs_fully_and_resize_bilinear_like_the_reference(tmp_path):
    from torchvision.transforms import v2 as T

    from clipjob.data.transforms import to_unit_float

    wnids = imagenet_wnids()
    for w in wnids:
        (tmp_path / w).mkdir()
    rng = np.random.default_rng(1)
    big = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((1000, 750), Image.BICUBIC)
    big.save(tmp_path / wnids[7] / "big.JPEG", quality=90)  # >= 2x the eval size: JPEG draft mode would kick in
    img, label = build_eval_set(f"imagenet:{tmp_path}", 224, "corenet").dataset[0]
    full = Image.open(tmp_path / wnids[7] / "big.JPEG").convert("RGB")  # reference: full decode, PIL bilinear
    want = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224), T.ToImage(),
                      T.ToDtype(torch.float32, scale=True)])(full)
    assert label == 7 and (to_unit_float(img) - want).abs().max() <= 1.01 / 255  # tensor vs PIL: rounding only


def test_should_refuse_class_folders_that_are_not_wnids(tmp_path):
    for i in range(1000):
        (tmp_path / str(i)).mkdir()
    with pytest.raises(ClipjobError, match="class folder '0' is not an ImageNet-1k wnid") as e:
        build_eval_set(f"imagenet:{tmp_path}", 224, "corenet")
    assert "\n" not in str(e.value)
