"""Frozen-feature probe for tiny-cpu-lit: train only the heads on cached trunk features, minutes per variant.

The preset's trunk (EfficientNet-Lite0, frozen) and text tower (MiniLM, frozen) never change, so a variant of the
heads, the loss or the eval can be tried on features computed once: `extract` runs clipjob's own trunk over every
training picture (each distinct picture once; ~14 min on 2 AVX2 cores for the demo's ~23,000 pictures at 224 px)
and the four eval sets (also flipped, for test-time flips); `train` embeds the captions with clipjob's MiniLM once,
then trains the preset's heads (the MLP heads with feature noise, the text projections, the shared logit scale, the
multi-positive loss, AdamW with warmup and cosine) on random batches of the features and prints top-1 on the
leave-one-style-out sets per seed and as the mean: held-out concepts in the seen style / in the unseen style, seen
concepts in the unseen style, held-out concepts in every seen style. The base recipe lands within a seed's spread
of `bench/loso.py --preset tiny-cpu-lit` (seed 0: 30.07 / 29.03 / 77.42 / 34.23 here, 29.41 / 30.32 / 76.13 /
34.38 in the trainer). One seed's held-out numbers move by up to 5 points, four seeds' by ~2: compare variants on
the same seeds, and on a second set of seeds before believing a 2-point change (README, session 21).

  python bench/lit_probe.py extract DATA FEATS     # DATA: clipjob data emoji --leave-out twemoji ... output
  python bench/lit_probe.py train FEATS [--members 3] [--seeds 0 1 2 3] [--subspace 0.5] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from clipjob.config import MINILM_LAYERS

SETS = {"ho_seen": "emoji-heldout:{d}", "ho_unseen": "emoji-heldout:{d}/unseen", "seen_unseen": "emoji-seen:{d}/unseen",
        "ho_all": "emoji-heldout-styles:{d}"}
EVALS = {"base": (False, False, False), "flip": (True, False, False), "centre-classes": (False, True, False),
         "centre-images": (False, False, True)}  # eval-only variants: (flip TTA, centre classes, centre images)


def _lit(overrides=()):
    from clipjob.config import build_config
    from clipjob.model.clip import build_model, build_tokenizer

    cfg = build_config("tiny-cpu-lit", overrides=["model.ensemble=1", *overrides])
    return cfg, build_model(cfg.model).eval(), build_tokenizer(cfg.model)


def extract(data: str, out: str, bf16: bool = False, pool: str = "") -> None:
    from clipjob.data.manifest import read_manifest
    from clipjob.data.transforms import eval_transform, to_unit_float
    from clipjob.eval.zeroshot import ShardImages, build_eval_set

    os.makedirs(out, exist_ok=True)
    cfg, model, _ = _lit([f"model.vision.pool={pool}"] if pool else [])
    size, tower = cfg.model.vision.image_size, model.visual

    def run(ds, name: str, flip: bool) -> None:
        path = f"{out}/{name}.pt"
        if os.path.exists(path):
            return
        t0, memo, rows, labels, caps = time.time(), {}, [], [], []
        for items in DataLoader(ds, batch_size=64, num_workers=1, collate_fn=list):
            items = [it for it in items if isinstance(it, tuple)]  # Skipped(reason) dropped
            raw = torch.stack([it[0] for it in items])
            keys = [hashlib.blake2b(r.numpy().tobytes(), digest_size=16).digest() for r in raw]
            new = [i for i, k in enumerate(keys) if k not in memo]
            if new:
                x = to_unit_float(raw[new])
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    f = tower.features(x).float()
                    ff = tower.features(torch.flip(x, [-1])).float() if flip else f
                memo.update((keys[i], (f[j], ff[j])) for j, i in enumerate(new))
            rows += [memo[k] for k in keys]
            labels += [it[1] for it in items]
            caps += [it[2] for it in items if len(it) > 2]
        f = torch.stack([r[0] for r in rows])
        tmp = f"{path}.tmp"
        torch.save({"f": f, "ff": torch.stack([r[1] for r in rows]) if flip else f, "labels": labels, "caps": caps}, tmp)
        os.replace(tmp, path)  # atomic: a killed run leaves no half file
        print(f"{name}: {len(labels)} pictures, {len(memo)} distinct, {time.time() - t0:.0f} s", flush=True)

    tf = eval_transform(size, cfg.model.vision.family)
    for name, spec in SETS.items():
        es = build_eval_set(spec.format(d=data), size, cfg.model.vision.family)
        torch.save({"names": es.classnames, "templates": es.templates}, f"{out}/{name}_meta.pt")
        run(es.dataset, name, flip=True)
    urls = [f"{data}/{s['name']}" for s in read_manifest(data)["shards"]]
    run(ShardImages(urls, lambda s: json.loads(s["json"])["concept"], tf, size, caption_key="txt"), "train", flip=False)


def text_embeddings(feats: str, layers: bool = False) -> dict:
    """MiniLM sentence embeddings (before any projection) of every training caption and every eval prompt; with
    `layers`, every layer's pooled output side by side (model.text.pool_layers=[0, ..., 6]), for --text-layers."""
    path = f"{feats}/text{'_layers' if layers else ''}.pt"
    if os.path.exists(path):
        return torch.load(path)
    _, model, tok = _lit([f"model.text.pool_layers={list(range(MINILM_LAYERS + 1))}"] if layers else [])

    def embed(texts):
        with torch.no_grad():
            return torch.cat([model.text.embed(tok(texts[i:i + 512])).float() for i in range(0, len(texts), 512)])

    caps = sorted(set(torch.load(f"{feats}/train.pt")["caps"]))
    out = {"caps": {c: i for i, c in enumerate(caps)}, "E": embed(caps)}
    for name in SETS:
        meta = torch.load(f"{feats}/{name}_meta.pt")
        prompts = [t.format(c) for c in meta["names"] for t in meta["templates"]]
        out[name] = embed(prompts).view(len(meta["names"]), len(meta["templates"]), -1)
    torch.save(out, path)
    return out


class Heads(nn.Module):
    """The preset's trainable part: standardisation, K MLP heads (each over its own random share of the features
    with --subspace < 1), K text projections of the sentence embedding, one logit scale."""

    def __init__(self, a, width: int, gen: torch.Generator, text_sd: torch.Tensor, logit_scale_init: float):
        super().__init__()
        k = max(1, round(a.subspace * width))
        self.a, self.text_sd = a, text_sd
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.register_buffer("subsets", torch.stack([torch.randperm(width, generator=gen)[:k] for _ in range(a.members)]))
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(k, a.hidden), nn.GELU(), nn.Linear(a.hidden, a.dim))
                                   for _ in range(a.members))
        d = len(text_sd)
        self.parts = len(a.text_layers.split(",")) if a.text_layers else 1
        scale = torch.ones(d)  # --part-weight: the first of the --text-layers parts scaled (its share of the proj)
        scale[:d // self.parts] = a.part_weight
        self.register_buffer("part_scale", scale)
        if a.text_hidden:  # --text-hidden: a GELU layer before the text projection (the trainer's is linear)
            self.tmlp = nn.Sequential(nn.Linear(d, a.text_hidden), nn.GELU())
            d = a.text_hidden
        self.proj = nn.Parameter(torch.randn(d, a.dim * a.members) * d ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def image(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, E), unit per member
        z, outs = self.norm(x), []
        for subset, head in zip(self.subsets, self.heads):
            zz = z[:, subset]
            if self.training and self.a.noise:
                zz = zz + self.a.noise * torch.randn_like(zz)
            outs.append(F.normalize(head(zz), dim=-1))
        return torch.stack(outs, 1)

    def text(self, e: torch.Tensor) -> torch.Tensor:
        if self.training and self.a.text_noise:
            e = e + self.a.text_noise * self.text_sd * torch.randn_like(e)
        if self.training and self.a.part_drop and self.parts > 1:  # drop whole parts (never all) per caption,
            # the kept ones scaled up so the sum's expected size stays
            keep = (torch.rand(*e.shape[:-1], self.parts) >= self.a.part_drop).float()
            keep[keep.sum(-1) == 0] = 1.0
            keep = keep * self.parts / keep.sum(-1, keepdim=True)
            e = e * keep.repeat_interleave(e.shape[-1] // self.parts, -1)
        e = e * self.part_scale
        if self.a.text_hidden:
            e = self.tmlp(e)
        return F.normalize((e @ self.proj).unflatten(-1, (len(self.heads), -1)), dim=-1)


def train(a) -> None:
    from clipjob.config import build_config
    from clipjob.train.ema import EMA
    from clipjob.train.loss import clip_loss
    from clipjob.train.optim import lr_at, param_groups

    torch.set_num_threads(a.threads)
    T = text_embeddings(a.feats, bool(a.text_layers))
    if a.text_layers:  # keep the chosen layers' pooled outputs (0: the token embeddings, 6: the sentence embedding)
        d = T["E"].shape[-1] // (MINILM_LAYERS + 1)
        keep = torch.cat([torch.arange(d * int(i), d * (int(i) + 1)) for i in a.text_layers.split(",")])
        T = {k: v[..., keep] if isinstance(v, torch.Tensor) else v for k, v in T.items()}
    tr = torch.load(f"{a.feats}/train.pt")
    X = tr["f"].float()
    ev = {s: torch.load(f"{a.feats}/{s}.pt") for s in SETS}
    if a.imagenet_scores:  # the shipped ImageNet classifier's log-probabilities appended (the conv head's 1,280 last)
        from clipjob.model.efficientnet import weights_file

        sd = torch.load(weights_file(), map_location="cpu", weights_only=True)
        add = lambda x: torch.cat([x, F.linear(x[:, -1280:], sd["_fc.weight"], sd["_fc.bias"]).log_softmax(1)], 1)  # noqa: E731
        X = add(X)
        for e in ev.values():
            e["f"], e["ff"] = add(e["f"].float()), add(e["ff"].float())
    if a.cols:  # keep these feature columns (start:end,...)
        cols = torch.cat([torch.arange(*map(int, r.split(":"))) for r in a.cols.split(",")])
        X = X[:, cols]
        for e in ev.values():
            e["f"], e["ff"] = e["f"][:, cols], e["ff"][:, cols]
    caption = torch.tensor([T["caps"][c] for c in tr["caps"]])
    concept_ids = {c: i for i, c in enumerate(sorted(set(tr["labels"])))}
    groups = torch.tensor([concept_ids[c] for c in tr["labels"]])
    n, width = X.shape

    # the preset's optimizer, schedule (warmup, cosine, betas, eps) and logit scale, with the probe's lr, steps and weight decay
    cfg = build_config("tiny-cpu-lit", overrides=[f"train.lr={a.lr}", f"train.steps={a.steps}",
                                                  f"train.weight_decay={a.wd}"])
    opt_cfg, scale_max = cfg.train, cfg.model.logit_scale_max

    def one(seed: int) -> dict:
        torch.manual_seed(seed)
        m = Heads(a, width, torch.Generator().manual_seed(seed + 7), T["E"].std(0), cfg.model.logit_scale_init)
        opt = torch.optim.AdamW(param_groups(m, opt_cfg.weight_decay), lr=opt_cfg.lr, betas=opt_cfg.betas,
                                eps=opt_cfg.eps)
        ema = EMA(m, a.ema) if a.ema else None  # the trainer's (parameters and BatchNorm statistics)
        perm, pos = torch.randperm(n), 0
        for step in range(a.steps):
            if pos + a.batch > n:
                perm, pos = torch.randperm(n), 0
            idx = perm[pos:pos + a.batch]
            pos += a.batch
            batches = [idx] + [torch.randint(0, n, (a.batch,)) for _ in range(a.members - 1)] if a.own_batches \
                else [idx] * a.members
            for g in opt.param_groups:
                g["lr"] = lr_at(step, opt_cfg)
            m.train()
            scale, seen, losses = m.logit_scale.exp().clamp(max=scale_max), {}, []
            for k, b in enumerate(batches):
                if id(b) not in seen:
                    seen[id(b)] = (m.image(X[b]), m.text(T["E"][caption[b]]))
                img, txt = seen[id(b)]
                losses.append(clip_loss(img[:, k], txt[:, k], scale, groups[b]))
            loss = torch.stack(losses).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                m.logit_scale.clamp_(0, math.log(scale_max))
            if ema is not None:
                ema.update(m)
        if ema is not None:  # evaluate the exponential moving average of the weights instead of the last ones
            m.load_state_dict(ema.state_dict())
        m.eval()
        res = {}
        with torch.no_grad():
            image_mean = m.image(X[torch.randperm(n, generator=torch.Generator().manual_seed(1))[:4096]]).mean(0)
            for s in SETS:
                classes = F.normalize(m.text(T[s].flatten(0, 1)).unflatten(0, T[s].shape[:2]).mean(1), dim=-1)
                plain, flipped = m.image(ev[s]["f"].float()), m.image(ev[s]["ff"].float())
                labels = torch.tensor(ev[s]["labels"])
                for v, (flip, centre_classes, centre_images) in EVALS.items():
                    c = F.normalize(classes - classes.mean(0), dim=-1) if centre_classes else classes
                    i = F.normalize(plain + flipped, dim=-1) if flip else plain
                    i = F.normalize(i - image_mean, dim=-1) if centre_images else i
                    hits = torch.einsum("bke,cke->bc", i, c).argmax(1) == labels
                    res[(v, s)] = hits.float().mean().item() * 100
                    res[("hits", v, s)] = hits.tolist()
        print(f"  seed {seed}: " + " / ".join(f"{res[('base', s)]:.2f}" for s in SETS)
              + f"  loss {loss.item():.3f}, logit scale {m.logit_scale.exp().item():.1f}", flush=True)
        return res

    t0 = time.time()
    results = [one(seed) for seed in a.seeds]
    if a.hits:  # each eval picture's right/wrong per seed, for error analysis
        with open(a.hits, "w") as f:
            json.dump({s: {"labels": ev[s]["labels"], "names": torch.load(f"{a.feats}/{s}_meta.pt")["names"],
                           "hits": [r[("hits", "base", s)] for r in results]} for s in SETS}, f)
    for v in EVALS:
        mean = " / ".join(f"{sum(r[(v, s)] for r in results) / len(results):.2f}" for s in SETS)
        print(f"{a.tag} [{v}]: {mean}  ({len(results)} seeds, {time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="trunk features of a leave-one-style-out dataset's pictures")
    ex.add_argument("data")
    ex.add_argument("feats")
    ex.add_argument("--bf16", action="store_true", help="the trunk under bf16 autocast (as the trainer on a bf16 CPU)")
    ex.add_argument("--pool", default="", help="model.vision.pool (default: the preset's)")
    t = sub.add_parser("train", help="train the heads on the features; top-1 on the four sets")
    t.add_argument("feats")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1000, 2000, 3000])
    t.add_argument("--members", type=int, default=3, help="model.ensemble")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--batch", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--wd", type=float, default=0.05)
    t.add_argument("--hidden", type=int, default=1024)
    t.add_argument("--dim", type=int, default=256, help="model.embed_dim (per member)")
    t.add_argument("--noise", type=float, default=0.5, help="model.vision.feature_noise")
    t.add_argument("--subspace", type=float, default=1.0, help="share of the features each member reads (random)")
    t.add_argument("--text-noise", type=float, default=0.0, help="Gaussian noise on the sentence embedding, in its sd")
    t.add_argument("--own-batches", action="store_true", help="each member on its own random batch")
    t.add_argument("--imagenet-scores", action="store_true", help="append ImageNet's 1,000 log-probabilities")
    t.add_argument("--ema", type=float, default=0.0, help="evaluate an EMA of the weights (this share per step)")
    t.add_argument("--text-layers", default="", help="MiniLM layers whose pooled outputs the text projection reads, "
                   "comma-separated, 0 (embeddings) to 6 (the sentence embedding); default: 6 alone")
    t.add_argument("--cols", default="", help="keep only these feature columns, START:END,... (e.g. 0:2064: the "
                   "averages of a pool=stages+max extract, as pool=stages)")
    t.add_argument("--text-hidden", type=int, default=0, help="a GELU layer this wide before the text projection")
    t.add_argument("--part-weight", type=float, default=1.0, help="scale the first --text-layers part by this")
    t.add_argument("--part-drop", type=float, default=0.0, help="in training, zero each --text-layers part of a "
                   "caption with this probability (never all of them)")
    t.add_argument("--hits", default="", help="write each eval picture's right/wrong per seed to this JSON file")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--tag", default="probe")
    a = ap.parse_args()
    extract(a.data, a.feats, a.bf16, a.pool) if a.cmd == "extract" else train(a)


if __name__ == "__main__":
    main()
