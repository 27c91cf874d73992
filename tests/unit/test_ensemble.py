"""model.ensemble: K image heads and K text projections over the frozen LiT towers, each pair trained by its own
contrastive loss; the embedding holds the members' unit vectors side by side, scaled by 1/sqrt(K), so every
similarity the evals compute is the mean of the members' cosines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipjob.config import build_config
from clipjob.errors import ConfigError
from clipjob.model import build_model, build_tokenizer
from clipjob.train.loss import build_loss, clip_loss

K, E = 3, 16
LIT = ["model.vision.family=efficientnet-lite0", "model.vision.image_size=64", "model.vision.head_hidden=32",
       "model.vision.freeze=true", "model.text.kind=minilm", "model.text.freeze=true", "model.text.context_length=16",
       f"model.embed_dim={E}"]
# fp32 sums of at most a few hundred products of unit-scale numbers: rounding ~1e-7 relative each, far below 1e-5;
# a member normalised with the others (the whole vector at once) moves the cosines by ~1e-1
TOL = 1e-5


def config(k: int = K, *sets: str):
    return build_config("tiny-cpu-scratch", None, [*LIT, f"model.ensemble={k}", *sets])


def ensemble(k: int = K, *sets: str):
    torch.manual_seed(0)
    cfg = config(k, *sets)
    return build_model(cfg.model, pretrained=False), cfg


def batch(n: int = 6):
    captions = ["a red apple", "a dog", "an icon of a house", "rain cloud", "a blue car", "two cats"][:n]
    return torch.rand(n, 3, 64, 64), build_tokenizer(config(1).model)(captions)


def members(x: torch.Tensor) -> torch.Tensor:
    """(N, K*E) raw tower outputs -> (K, N, E) unit vectors."""
    return F.normalize(x.unflatten(-1, (K, E)), dim=-1).transpose(0, 1)


def test_should_score_the_mean_of_the_members_cosines():
    model, _ = ensemble()
    model.eval()
    images, tokens = batch()
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens)
        raw_img, raw_txt = members(model.visual(images)), members(model.text(tokens))
    assert img.shape == txt.shape == (6, K * E)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(6), atol=TOL, rtol=0)
    torch.testing.assert_close(img.unflatten(-1, (K, E)).norm(dim=-1), torch.full((6, K), K**-0.5), atol=TOL, rtol=0)
    cosines = torch.einsum("kie,kje->kij", raw_img, raw_txt)
    torch.testing.assert_close(img @ txt.T, cosines.mean(0), atol=TOL, rtol=0)
    assert (cosines[0] - cosines[1]).abs().max() > 0.05  # the members are different maps (own initialisation)


def test_should_train_each_member_by_its_own_loss():
    """The loss is the mean of the members' own CLIP losses, so a member's gradient is 1/K of what its own loss
    alone gives it: nothing of another member reaches it (a loss on the whole vector would couple them)."""
    model, _ = ensemble()
    model.train()
    images, tokens = batch()
    out = model(images, tokens)
    loss = build_loss("clip", K)(out.image_features, out.text_features, out.logit_scale)
    parts = [clip_loss(i, t, out.logit_scale) for i, t in zip(members(model.visual(images).detach()),
                                                               members(model.text(tokens).detach()))]
    torch.testing.assert_close(loss.detach(), torch.stack(parts).mean(), atol=TOL, rtol=0)
    loss.backward()
    together = model.visual.head[1][0].weight.grad.clone()
    model.zero_grad()
    out = model(images, tokens)
    own = [clip_loss(i, t, out.logit_scale) for i, t in zip(members(model.visual(images)), members(model.text(tokens)))]
    own[1].backward()
    assert model.visual.head[0][0].weight.grad is None or not model.visual.head[0][0].weight.grad.any()
    alone = model.visual.head[1][0].weight.grad
    assert alone.abs().max() > 0
    # fresh noise-free forward, same batch: member 1's gradients agree to rounding (sums of ~2,000 fp32 products)
    torch.testing.assert_close(together, alone / K, atol=1e-6 * alone.abs().max().item(), rtol=1e-4)


def test_should_draw_each_members_feature_noise_apart():
    model, _ = ensemble(K, "model.vision.feature_noise=0.5")
    model.train()
    seen = []
    for h in model.visual.head:
        h.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model.visual(torch.rand(8, 3, 64, 64))
    assert len(seen) == K
    # each input is the same standardised features plus its own N(0, 0.25) draw: two inputs differ by a
    # N(0, 0.5) draw per number, mean |difference| = sqrt(0.5 * 2 / pi) = 0.56
    assert (seen[0] - seen[1]).abs().mean() > 0.4 and (seen[1] - seen[2]).abs().mean() > 0.4


def test_should_give_per_member_unit_class_embeddings_in_the_zero_shot_classifier():
    from clipjob.eval.zeroshot import text_classifier

    model, cfg = ensemble()
    model.eval()
    W = text_classifier(model, build_tokenizer(cfg.model), ["apple", "dog", "house"], ["{}", "a picture of {}."],
                        torch.device("cpu"))
    assert W.shape == (K * E, 3)
    torch.testing.assert_close(W.T.unflatten(-1, (K, E)).norm(dim=-1), torch.full((3, K), K**-0.5), atol=TOL, rtol=0)


def test_should_count_every_members_head_in_the_flops_and_the_description():
    from clipjob.commands.ckpt import describe_model
    from clipjob.model.efficientnet import head_flops
    from clipjob.train.flops import flops_per_sample

    one, three = config(1).model, config(3).model
    assert flops_per_sample(three, 64) - flops_per_sample(one, 64) == 3 * 2 * head_flops(one.vision, E)
    assert "3 x MLP heads 32 wide" in describe_model(three) and "MLP head 32 wide" in describe_model(one)


@pytest.mark.parametrize("sets, message", [
    (["model.ensemble=0"], r"^model.ensemble: must be between 1 and 16, got 0$"),
    (["model.ensemble=2", "model.text.kind=transformer", "model.text.freeze=false"],
     r"^model.ensemble=2: needs model.vision.family=efficientnet-lite0 and model.text.kind=minilm"),
    (["model.ensemble=2", "model.text.lock_proj=true"], r"^model.ensemble=2: needs .* lock_proj=false"),
])
def test_should_say_what_an_ensemble_needs_when_the_config_cannot_have_one(sets, message):
    with pytest.raises(ConfigError, match=message):
        build_config("tiny-cpu-scratch", None, [*LIT, *sets])
