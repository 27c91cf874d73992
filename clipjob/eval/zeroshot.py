"""Zero-shot classification: class names x prompt templates -> a text classifier; images -> top-1/top-5.

Protocol (OpenAI / CoreNet): per class, L2-normalise each prompt embedding, average, renormalise; logits are
100 * image_features @ classifier. Data sources:
- `emoji-heldout:DIR` / `emoji-seen:DIR`: the embedded emoji dataset's held-out (unseen) or seen concepts;
  `emoji-heldout-styles:DIR`: its held-out concepts in every training emoji style (same classes as emoji-heldout);
- `folder:PATH`: any ImageFolder layout (class = folder name, or names from --classnames JSON);
- `imagenet:PATH`: an ImageFolder-layout ImageNet validation set (the 1000 wnid folders, sorted, give the labels;
  OpenAI class names and 80 templates), or its webdataset shards (`{key}.jpg` + `{key}.cls`, the label index
  in sorted-wnid order) as a directory with manifest.json or *.tar, a brace pattern or a glob, at any URL;
- `captions:URL`: any shard set whose samples hold an image and a `.txt` caption (a directory with
  manifest.json or *.tar, a brace pattern or a glob): retrieval only, no classes.
Retrieval (eval/retrieval.py: image->text and text->image recall@1/5/10) runs on the sets with captions: always
on `captions:`, on the `emoji-*:` sets when asked (`retrieval=True`, `clipjob eval zeroshot
--retrieval`); the other kinds have no captions, and asking them for retrieval is an error.
Shards are read as training reads them (clipjob.data.shards.read_tar_samples): bad samples and unreadable shards
are skipped and counted by reason (`bad_samples_by_reason` in the result); so are a folder's files that do not
decode (corrupt_image, image_too_large, as training decodes them). Accuracy is over the good images alone; a set
with none is a one-line error.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from clipjob import fs
from clipjob.data.decode import BadSample, decode_caption, decode_image
from clipjob.data.pipeline import lower_priority
from clipjob.data.shards import read_tar_samples
from clipjob.data.transforms import eval_transform, to_unit_float
from clipjob.errors import ClipjobError, RetryableError
from clipjob.eval.retrieval import format_retrieval, retrieval_result
from clipjob.hostmem import restore_malloc
from clipjob.model.tokenizer import trim_padding
from clipjob.train.metrics import Ticker

EMOJI_TEMPLATES = ["{}", "an emoji of {}.", "a {} emoji.", "an icon of {}.", "a picture of {}.",
                   "a cartoon of {}.", "a small image showing {}."]
GENERIC_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.",
                     "a close-up photo of a {}.", "a cropped photo of a {}.", "a good photo of a {}.", "{}"]
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")
FULL_DECODE = 1 << 16  # decode target for ImageNet: no JPEG draft-mode reduction, as the reference protocol decodes
EMOJI_SETS = {"emoji-heldout": ("heldout", "heldout_concepts.json"), "emoji-seen": ("seen_eval", "seen_concepts.json"),
              "emoji-heldout-styles": ("heldout_styles", "heldout_concepts.json")}  # kind -> (folder, class names)
KINDS = (*EMOJI_SETS, "folder", "imagenet", "captions")
CAPTION_KINDS = (*EMOJI_SETS, "captions")  # the kinds whose samples carry a caption


@dataclass
class EvalSet:
    name: str
    classnames: list[str]  # [] = no classification (a captions: set)
    templates: list[str]
    dataset: Dataset | IterableDataset  # yields (image tensor, label), or (image, label, caption) with retrieval
    size: int | None = None
    retrieval: bool = False  # the dataset yields captions: image<->text recall@K is computed


@dataclass(frozen=True)
class Skipped:
    """What an eval set yields instead of a bad image (a folder's file, a shard's sample) or an unreadable
    shard: counted by reason, not evaluated."""

    reason: str  # BadSample / shard reasons, as in training (corrupt_image, truncated_shard, ...)
    count: int = 1


class FolderImages(Dataset):
    """The image files of an ImageFolder layout; item i is (image tensor, label), or `Skipped(reason)` when the
    file is not an image that decodes (corrupt_image, image_too_large: the reasons training counts) or cannot be
    read at all (unreadable_file: permissions, a dangling link, a folder named like an image). Storage that does
    not answer is not skipped: its RetryableError ends the eval."""

    def __init__(self, files: list[tuple[str, int]], transform: Callable, size: int):
        self.files, self.transform, self.size = files, transform, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path, label = self.files[i]
        try:
            img = decode_image({"jpg": fs.read_bytes(path)}, self.size)
        except RetryableError:
            raise
        except ClipjobError:  # one file that cannot be read: fs.describe said why; counted like a bad image
            return Skipped("unreadable_file")
        except BadSample as e:
            return Skipped(e.reason)
        return self.transform(img), label


class ShardImages(IterableDataset):
    """Samples of webdataset shards labelled by a JSON field (emoji) or by a `cls` field, read through the
    training reader; yields (image tensor, label), with `caption_key` (image tensor, label, caption), or
    `Skipped(reason)` for each bad sample (image or caption, as training decodes them) or shard."""

    def __init__(self, urls: list[str], label_of: Callable[[dict], int], transform: Callable, size: int,
                 caption_key: str | None = None):
        self.urls, self.label_of, self.transform, self.size = urls, label_of, transform, size
        self.caption_key = caption_key

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        urls = self.urls[info.id::info.num_workers] if info else self.urls
        bad: Counter = Counter()  # read_tar_samples counts duplicate keys and broken shards here
        for url in urls:
            for sample in read_tar_samples(url, bad, setting=None):
                yield from _drain(bad)
                try:
                    image = decode_image(sample, self.size)
                    caption = decode_caption(sample, self.caption_key) if self.caption_key else None
                except BadSample as e:
                    yield Skipped(e.reason)
                    continue
                item = (self.transform(image), self.label_of(sample))
                yield item if caption is None else (*item, caption)
            yield from _drain(bad)


def _drain(bad: Counter) -> Iterator[Skipped]:
    yield from (Skipped(reason, n) for reason, n in bad.items())
    bad.clear()


def collate_eval(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str] | None, Counter]:
    """A batch of (image, label[, caption]) items and `Skipped`s -> (images, labels, captions, skipped by
    reason); images and labels are None when every item was skipped, captions None when items have none."""
    skipped: Counter = Counter()
    for x in items:
        if isinstance(x, Skipped):
            skipped[x.reason] += x.count
    good = [x for x in items if not isinstance(x, Skipped)]
    if not good:
        return None, None, None, skipped
    images, labels = default_collate([x[:2] for x in good])
    return images, labels, ([x[2] for x in good] if len(good[0]) > 2 else None), skipped


def _folder_files(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    fsys, path = fs.get_fs(root)
    classes = sorted(n for n in fs.ls(root) if fsys.isdir(f"{path.rstrip('/')}/{n}"))
    if not classes:
        raise ClipjobError(f"{root}: no class folders found (expected ImageFolder layout: ROOT/CLASS/IMAGE)")
    files = []
    for i, c in enumerate(classes):
        for n in fs.ls(fs.join(root, c)):
            if n.endswith(IMAGE_EXTS):
                files.append((fs.join(root, c, n), i))
    return classes, files


def load_templates(spec: str | None, default: list[str]) -> list[str]:
    if not spec:
        return default
    raw = fs.read_text(spec)
    t = json.loads(raw) if spec.endswith(".json") else [line for line in raw.splitlines() if line.strip()]
    if not t or not all("{}" in x for x in t):
        raise ClipjobError(f"{spec}: templates must be a non-empty list of strings containing '{{}}'")
    return t


def check_spec(spec: str, retrieval: bool = False) -> tuple[str, str]:
    """(kind, root) of a --data spec; a one-line error for an unknown kind, or for retrieval asked of a kind
    without captions."""
    kind, _, root = spec.partition(":")
    if kind not in KINDS or not root:
        raise ClipjobError(f"--data {spec!r}: expected emoji-heldout:DIR, emoji-heldout-styles:DIR, emoji-seen:DIR, "
                           "folder:PATH, imagenet:PATH or captions:URL")
    if retrieval and kind not in CAPTION_KINDS:
        raise ClipjobError(f"--retrieval: --data {spec!r} has no captions; retrieval runs on emoji-heldout:, "
                           "emoji-heldout-styles:, emoji-seen: and captions:URL (shards with a .txt per image)")
    return kind, root


def build_eval_set(spec: str, image_size: int, family: str, classnames_file: str | None = None,
                   templates_file: str | None = None, retrieval: bool = False) -> EvalSet:
    """The eval set of a --data spec; `retrieval`: its dataset yields captions too (a captions: set always)."""
    kind, root = check_spec(spec, retrieval)
    tf = eval_transform(image_size, family)
    if kind == "captions":
        from clipjob.data.shards import expand_shard_urls, manifest_sample_count

        ds = ShardImages(expand_shard_urls(root), lambda s: -1, tf, image_size, caption_key="txt")
        return EvalSet(spec, [], [], ds, manifest_sample_count(root), retrieval=True)
    if kind in EMOJI_SETS:
        from clipjob.data.manifest import read_manifest

        sub, names_file = EMOJI_SETS[kind]
        if not fs.exists(fs.join(root, sub, "manifest.json")):
            raise ClipjobError(f"--data {spec!r}: {fs.join(root, sub)}/manifest.json not found: not a `clipjob data "
                               f"emoji` dataset, or one built before clipjob wrote {sub}/ (rebuild it)")
        names = json.loads(fs.read_text(fs.join(root, names_file)))
        index = {n: i for i, n in enumerate(names)}
        man = read_manifest(fs.join(root, sub))
        urls = [fs.join(root, sub, s["name"]) for s in man["shards"]]
        ds = ShardImages(urls, lambda s: index[json.loads(s["json"])["concept"]], tf, image_size,
                         caption_key="txt" if retrieval else None)
        return EvalSet(spec, names, load_templates(templates_file, EMOJI_TEMPLATES), ds, man.get("total_samples"),
                       retrieval=retrieval)
    if kind == "imagenet" and _is_shard_spec(root):
        return _imagenet_shards(root, image_size, family, templates_file)
    classes, files = _folder_files(root)
    if kind == "imagenet":
        from clipjob.eval.imagenet_meta import imagenet_classnames, openai_imagenet_templates

        names = imagenet_classnames()
        if len(classes) != len(names):
            raise ClipjobError(f"{root}: expected 1000 wnid folders for imagenet:, found {len(classes)}; "
                               "use folder:PATH for other class sets")
        _check_wnids(root, classes)
        templates = load_templates(templates_file, openai_imagenet_templates())
    else:
        names = json.loads(fs.read_text(classnames_file)) if classnames_file else [c.replace("_", " ") for c in classes]
        if isinstance(names, dict):
            names = [names[c] for c in classes]
        if len(names) != len(classes):
            raise ClipjobError(f"{classnames_file}: {len(names)} names for {len(classes)} class folders")
        templates = load_templates(templates_file, GENERIC_TEMPLATES)
    decode = FULL_DECODE if kind == "imagenet" else image_size
    return EvalSet(spec, names, templates, FolderImages(files, tf, decode), len(files))


def _is_shard_spec(root: str) -> bool:
    return root.endswith(".tar") or any(c in root for c in "{*?[") or fs.exists(fs.join(root, "manifest.json")) \
        or bool(fs.glob(fs.join(root, "*.tar")))


def _check_wnids(root: str, classes: list[str]) -> None:
    """Labels come from the sorted folder names: they must be the ImageNet-1k wnids, or every label is off."""
    from clipjob.eval.imagenet_meta import imagenet_wnids

    try:
        wnids = imagenet_wnids()
    except ClipjobError:
        return  # no wnid list installed (timm): only the folder count can be checked
    bad = [c for c, w in zip(classes, wnids) if c != w]
    if bad:
        raise ClipjobError(f"{root}: class folder {bad[0]!r} is not an ImageNet-1k wnid (expected the folders "
                           f"{wnids[0]} ... {wnids[-1]}); use folder:PATH with --classnames for other layouts")


def _cls_label(sample: dict) -> int:
    where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')!r}"
    try:
        label = int(sample["cls"])
    except (KeyError, ValueError):
        raise ClipjobError(f"{where} has no integer .cls label (ImageNet shards hold {{key}}.jpg + {{key}}.cls)") from None
    if not 0 <= label < 1000:
        raise ClipjobError(f"{where} has label {label}, not in 0..999")
    return label


def _imagenet_shards(root: str, image_size: int, family: str, templates_file: str | None) -> EvalSet:
    from clipjob.data.shards import expand_shard_urls, manifest_sample_count
    from clipjob.eval.imagenet_meta import imagenet_classnames, openai_imagenet_templates

    ds = ShardImages(expand_shard_urls(root), _cls_label, eval_transform(image_size, family), FULL_DECODE)
    return EvalSet(f"imagenet:{root}", imagenet_classnames(), load_templates(templates_file, openai_imagenet_templates()),
                   ds, manifest_sample_count(root))


def eval_worker_init(nice: int, _worker_id: int = 0) -> None:
    """Zero-shot eval DataLoader workers: lower priority (see data.pipeline.lower_priority) and glibc's own
    malloc settings back (hostmem.restore_malloc: eval peak tree PSS 1,132 -> 1,016 MiB on bench/'s 2,000
    images, fp32; with glibc's defaults everywhere 977-999 MiB)."""
    lower_priority(nice)
    restore_malloc()


@torch.no_grad()
def text_classifier(model, tokenizer, classnames: list[str], templates: list[str], device: torch.device,
                    batch_classes: int = 64, trim: bool = True,
                    check_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """(E, C): per class the renormalised mean of its normalised prompt embeddings. `trim`: run the text
    tower on the prompts' real length, not the full context (same features; see tokenizer.trim_padding).
    `check_stop` is called before each chunk of classes and may raise to abandon the work."""
    cols = []
    for i in range(0, len(classnames), batch_classes):
        if check_stop:
            check_stop()
        chunk = classnames[i:i + batch_classes]
        prompts = [t.format(c) for c in chunk for t in templates]
        tokens = tokenizer(prompts)
        feats = model.encode_text((trim_padding(tokens) if trim else tokens).to(device)).float()
        feats = feats.view(len(chunk), len(templates), -1).mean(1)
        cols.append(model.unit(feats))  # each model.ensemble member's part normalised on its own
    return torch.cat(cols).T


def accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    top = logits.topk(max(ks), dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, :k].any(1).sum()) for k in ks}


@torch.inference_mode()
def evaluate(model, tokenizer, es: EvalSet, device: torch.device, batch_size: int = 256, workers: int = 2,
             precision: str = "fp32", progress: bool = True, trim_text: bool = True, worker_nice: int = 19,
             check_stop: Callable[[], None] | None = None, progress_every_s: float = 30.0) -> dict:
    """Top-1/top-5 of a model on an eval set (one with classes), and image<->text recall@1/5/10 when
    `es.retrieval`. `check_stop` is called between batches and may raise to abandon the evaluation (SIGTERM:
    see eval/runner.py); the DataLoader's workers end with its iterator."""
    model.eval()
    t0 = time.time()
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device.type, enabled=False)
    with amp:
        W = text_classifier(model, tokenizer, es.classnames, es.templates, device, trim=trim_text,
                            check_stop=check_stop) if es.classnames else None
    loader = DataLoader(es.dataset, batch_size=batch_size, num_workers=workers, shuffle=False, collate_fn=collate_eval,
                        worker_init_fn=functools.partial(eval_worker_init, worker_nice) if workers else None)
    meter = Ticker(es.size, f"zero-shot {es.name}", "image", progress, progress_every_s)
    ks = (1, min(5, len(es.classnames)))
    hits, n, bad, feats, captions = {1: 0, 5: 0}, 0, Counter(), [], []
    for images, labels, caps, skipped in loader:
        if check_stop:
            check_stop()
        bad.update(skipped)
        if images is None:
            meter.update(sum(skipped.values()), done=n + sum(bad.values()))
            continue
        with amp:
            f = model.encode_image(to_unit_float(images.to(device))).float()
        if W is not None:
            acc = accuracy(100.0 * f @ W, labels.to(device), ks=ks)
            hits[1], hits[5] = hits[1] + acc[1], hits[5] + acc[ks[1]]
        if es.retrieval:
            feats.append(f)
            captions.extend(caps)
        n += images.shape[0]
        meter.update(images.shape[0] + sum(skipped.values()), done=n + sum(bad.values()))  # skipped ones are done too
    meter.close()
    if n == 0 and bad:
        raise ClipjobError(f"{es.name}: no image could be evaluated, all {sum(bad.values())} skipped "
                           f"({_skipped_text(bad)}): check the files")
    if n == 0:
        raise ClipjobError(f"{es.name}: no images found")
    r = {"data": es.name, "images": n, **(_classification(es, hits, n) if W is not None else {})}
    if es.retrieval:
        with amp:
            r.update(retrieval_result(model, tokenizer(captions), torch.cat(feats), device, trim_text, check_stop))
    return {**r, "seconds": time.time() - t0, "images_per_s": n / max(1e-9, time.time() - t0),
            "bad_samples": sum(bad.values()), "bad_samples_by_reason": dict(sorted(bad.items()))}


def _classification(es: EvalSet, hits: dict[int, int], n: int) -> dict:
    c = len(es.classnames)
    return {"top1": 100.0 * hits[1] / n, "top5": 100.0 * hits[5] / n, "classes": c, "chance_top1": 100.0 / c,
            "chance_top5": 100.0 * min(5, c) / c, "templates": len(es.templates)}


def _skipped_text(bad: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(bad.items()))


def format_result(r: dict) -> str:
    """The result line (top-1/top-5 and chance, retrieval recall@K, skipped samples), then for a set with
    classes the CoreNet-style top1=/top5= lines."""
    bad = r.get("bad_samples_by_reason") or {}
    skipped = f"; skipped: {_skipped_text(bad)}" if bad else ""  # bad samples / shards, by reason
    retrieval = format_retrieval(r)
    if "top1" not in r:  # a captions: set
        return f"{r['data']}: {retrieval}  over {r['images']} images, {r['captions']} distinct captions{skipped}"
    retrieval = f"  {retrieval} ({r['captions']} captions)" if retrieval else ""
    return (f"{r['data']}: top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  over {r['classes']} classes, "
            f"{r['images']} images (chance {r['chance_top1']:.2f}% / {r['chance_top5']:.2f}%){retrieval}{skipped}\n"
            f"top1={{'zero_shot_image_logits': {round(r['top1'], 3)}}}\n"
            f"top5={{'zero_shot_image_logits': {round(r['top5'], 3)}}}")
