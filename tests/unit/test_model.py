import math

import pytest
import torch

from clipjob.config import build_config
from clipjob.model import build_model
from clipjob.model.transformer import Attention


def tiny(**sets):
    base = ["model.vision.width=64", "model.vision.layers=2", "model.vision.heads=2", "model.text.width=64",
            "model.text.layers=2", "model.text.heads=2", "model.text.context_length=16", "model.embed_dim=32"]
    return build_config("tiny-cpu-scratch", None, base + [f"{k}={v}" for k, v in sets.items()])


def naive_attention(attn: Attention, x: torch.Tensor, causal: bool) -> torch.Tensor:
    b, s, d = x.shape
    h = attn.heads
    q, k, v = attn.qkv(x).split(d, dim=-1)
    q, k, v = (t.view(b, s, h, d // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return attn.proj(out.transpose(1, 2).reshape(b, s, d))


@pytest.mark.parametrize("causal", [False, True])
def test_should_match_naive_attention_when_using_sdpa(causal):
    torch.manual_seed(0)
    attn = Attention(32, 4, causal=causal)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), naive_attention(attn, x, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_should_match_naive_attention_when_running_in_bf16_on_the_cpu(causal):
    # bf16 on the CPU takes matmul_attention (clipjob.model.transformer.attention): same result, within bf16
    torch.manual_seed(0)
    attn = Attention(64, 4, causal=causal)
    x = torch.randn(3, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), naive_attention(attn, x, causal), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("case", ["plain", "causal", "bool-mask", "float-mask", "one-query"])
def test_should_match_sdpa_when_writing_attention_out_as_matmuls(case):
    # clipjob's CPU half-precision attention, run in fp32 so that only summation order differs from torch's
    # kernel (sums of <= 11 terms of size ~1: errors ~1e-6): outputs and the gradients of q, k, v
    import torch.nn.functional as F

    from clipjob.model.transformer import matmul_attention

    torch.manual_seed(0)
    sq = 1 if case == "one-query" else 11
    qkv = [torch.randn(3, 4, s, 16, requires_grad=True) for s in (sq, 11, 11)]
    mask, causal = None, case == "causal"
    if case in ("bool-mask", "one-query"):
        mask = (torch.arange(11)[None, :] <= torch.tensor([0, 4, 10])[:, None]).view(3, 1, 1, 11)
    if case == "float-mask":
        mask = torch.randn(3, 1, sq, 11)
    outs, grads = [], []
    for fn in (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
               lambda q, k, v: matmul_attention(q, k, v, mask, causal)):
        out = fn(*qkv)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([t.grad.clone() for t in qkv])
        for t in qkv:
            t.grad = None
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for mine, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)


def test_should_take_matmul_attention_in_bf16_on_the_cpu_with_strided_heads():
    # the q|k|v projection's heads are strided views; bf16 (8-bit mantissa, relative rounding 2^-8 per
    # operation, a few operations deep) stays within 3e-2 of the fp32 result, gradients included
    from clipjob.model import transformer as tr

    torch.manual_seed(0)
    qkv = torch.randn(2, 9, 3, 4, 16)
    ref_in = qkv.clone().requires_grad_(True)
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in.permute(2, 0, 3, 1, 4), is_causal=True)
    ref.sum().backward()
    half = qkv.bfloat16().requires_grad_(True)
    out = tr.attention(*half.permute(2, 0, 3, 1, 4), causal=True)
    out.sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.detach(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(half.grad.float(), ref_in.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_should_equal_the_full_block_when_computing_one_token(causal):
    from clipjob.model.transformer import Transformer

    torch.manual_seed(0)
    t = Transformer(32, 2, 4, 4.0, "gelu", 1e-5, causal=causal).eval()
    x = torch.randn(5, 9, 32)
    index = torch.tensor([0, 3, 8, 5, 1])
    full = t(x)[torch.arange(5), index]
    torch.testing.assert_close(t(x, index), full, atol=1e-5, rtol=1e-5)


def test_should_give_the_same_gradients_when_computing_one_token():
    from clipjob.model.transformer import Transformer

    torch.manual_seed(0)
    t = Transformer(32, 2, 4, 4.0, "gelu", 1e-5, causal=True)
    x = torch.randn(3, 7, 32)
    index = torch.tensor([6, 2, 4])
    t(x)[torch.arange(3), index].square().sum().backward()
    full = {n: p.grad.clone() for n, p in t.named_parameters()}
    t.zero_grad()
    t.grad_checkpointing = True
    t(x, index).square().sum().backward()
    for n, p in t.named_parameters():
        torch.testing.assert_close(p.grad, full[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("family", ["openai", "corenet"])
def test_should_return_unit_features_when_encoding(family):
    cfg = tiny(**{"model.vision.family": family, "model.vision.patch_size": 16 if family == "corenet" else 8})
    m = build_model(cfg.model).eval()
    out = m(torch.rand(2, 3, 64, 64), torch.randint(1, 1000, (2, 16)))
    assert out.image_features.shape == (2, 32) and out.text_features.shape == (2, 32)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(2))
    assert math.isclose(out.logit_scale.item(), 1 / 0.07, rel_tol=1e-5)


def test_should_clamp_the_logit_scale_at_100():
    m = build_model(tiny().model)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.scale().item() == 100.0
    m.clamp_logit_scale()
    assert math.isclose(m.logit_scale.item(), math.log(100), rel_tol=1e-6)


def test_should_pool_at_the_eot_token_when_encoding_text():
    m = build_model(tiny().model).eval()
    toks = torch.zeros(1, 16, dtype=torch.long)
    toks[0, :4] = torch.tensor([49406, 320, 1929, 49407])
    a = m.encode_text(toks)
    toks2 = toks.clone()
    toks2[0, 6] = 5  # a token after EOT cannot change the causal output at the EOT position
    torch.testing.assert_close(a, m.encode_text(toks2))


def test_should_give_the_same_gradients_when_checkpointing_activations():
    torch.manual_seed(0)
    m = build_model(tiny().model)
    x, t = torch.rand(2, 3, 64, 64), torch.randint(1, 1000, (2, 16))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        out = m(x, t)
        (out.image_features @ out.text_features.T).sum().backward()
        grads.append(m.visual.transformer.blocks[0].attn.qkv.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_should_match_sentence_transformers_when_loading_minilm():
    st = pytest.importorskip("sentence_transformers")
    from clipjob.model.text import MiniLMText, MiniLMTokenizer, minilm_dir

    cfg = build_config("tiny-cpu")
    ours = MiniLMText(cfg.model.text, 8).eval()
    ref = st.SentenceTransformer(minilm_dir(), device="cpu")
    texts = ["a red apple", "an emoji of a smiling face with sunglasses", "Zürich 2024!"]
    expected = torch.tensor(ref.encode(texts, normalize_embeddings=False))
    got = ours.embed(MiniLMTokenizer(24)(texts))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_should_reuse_cached_text_features_when_the_minilm_tower_is_frozen():
    from clipjob.model.text import MiniLMText, MiniLMTokenizer

    cfg = build_config("tiny-cpu")
    m = MiniLMText(cfg.model.text, 8).eval()
    toks = MiniLMTokenizer(24)(["a cat", "a dog", "a cat"])
    first = m(toks)
    assert len(m._cache) == 2
    torch.testing.assert_close(first, m.embed(toks) @ m.proj)
    torch.testing.assert_close(m(toks), first)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["proj"]


def test_should_read_the_word_embeddings_beside_the_sentence_when_pooling_minilm_layers():
    from clipjob.model.text import MiniLMText, MiniLMTokenizer

    base = build_config("tiny-cpu").model.text
    sentence = MiniLMText(base, 8).eval()
    both = MiniLMText(build_config("tiny-cpu", None, ["model.text.pool_layers=[0,6]"]).model.text, 8).eval()
    assert both.proj.shape == (768, 8)
    texts = ["a cat", "an emoji of a smiling face with sunglasses"]
    toks, wider = MiniLMTokenizer(24)(texts), MiniLMTokenizer(40)(texts)
    got = both.embed(toks)
    # the last 384: the shipped sentence embedding; the first: the caption's token embeddings averaged over its
    # real tokens (padding excluded) and normalised
    torch.testing.assert_close(got[:, 384:], sentence.embed(toks))
    with torch.no_grad():
        pos = torch.arange(toks.shape[1])
        x = both.ln_emb(both.word(toks) + both.position(pos) + both.token_type(torch.zeros_like(toks)))
        real = (toks != 0).unsqueeze(-1).float()
        words = torch.nn.functional.normalize((x * real).sum(1) / real.sum(1), dim=-1)
    torch.testing.assert_close(got[:, :384], words)
    torch.testing.assert_close(both.embed(wider), got, atol=1e-5, rtol=0)  # padding changes nothing
    assert both(toks).shape == (2, 8) and len(both._cache) == 2
    mid = MiniLMText(build_config("tiny-cpu", None, ["model.text.pool_layers=[0,3]"]).model.text, 8).eval()
    assert mid.proj.shape == (768, 8)
    torch.testing.assert_close(mid.embed(toks)[:, :384], words)
    assert not torch.allclose(mid.embed(toks)[:, 384:], got[:, 384:], atol=1e-2)  # layer 3 is not the last
    from clipjob.commands.ckpt import describe_model

    described = describe_model(build_config("tiny-cpu", None, ["model.text.pool_layers=[0,6]"]).model)
    assert "all-MiniLM-L6-v2, projection reads layers 0+6)" in described


@pytest.mark.parametrize("value, says", [("[0,7]", "from 0"), ("[6,0]", "increasing order"), ("[0,0]", "each once")])
def test_should_refuse_bad_minilm_pool_layers(value, says):
    from clipjob.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.text\.pool_layers") as e:
        build_config("tiny-cpu", None, [f"model.text.pool_layers={value}"])
    assert says in str(e.value)
    with pytest.raises(ConfigError, match="only for model.text.kind=minilm"):
        build_config("tiny-cpu", None, ["model.text.kind=transformer", "model.text.pool_layers=[0,6]"])
    with pytest.raises(ConfigError, match="lock_proj=false"):
        build_config("tiny-cpu", None, ["model.text.pool_layers=[0,6]", "model.text.lock_proj=true"])


@pytest.mark.parametrize("embed_dim", [384, 256, 512])
def test_should_keep_the_frozen_sentence_space_when_the_text_projection_is_locked(embed_dim):
    from clipjob.errors import ConfigError
    from clipjob.model.text import MiniLMTokenizer

    cfg = build_config("tiny-cpu", None, [f"model.embed_dim={embed_dim}", "model.text.lock_proj=true"])
    m = build_model(cfg.model)
    toks = MiniLMTokenizer(24)(["a cat", "a red apple", "a dog wearing a hat"])
    sentences = m.text.embed(toks)  # unit vectors in MiniLM's 384-d space
    feats = m.text(toks)  # before encode_text's normalisation
    # an orthonormal map keeps lengths and angles (all of them when it widens; a 256-d cut keeps what it keeps
    # exactly, so check that it is a fixed orthonormal map instead)
    P = m.text.proj.detach().double()
    eye = torch.eye(min(P.shape), dtype=torch.float64)
    torch.testing.assert_close(P.T @ P if P.shape[0] >= P.shape[1] else P @ P.T, eye, atol=1e-6, rtol=0)
    if embed_dim >= 384:
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(feats @ feats.T, sentences @ sentences.T, atol=1e-5, rtol=0)
    if embed_dim == 384:
        torch.testing.assert_close(feats, sentences)
    assert not any(p.requires_grad for p in m.text.parameters())
    torch.testing.assert_close(build_model(cfg.model).text.proj, m.text.proj, atol=0, rtol=0)  # same every run
    start = build_model(build_config("tiny-cpu", None, [f"model.embed_dim={embed_dim}",
                                                        "model.text.proj_init=sentence"]).model).text
    torch.testing.assert_close(start.proj.detach(), m.text.proj.detach(), atol=0, rtol=0)  # starts there, trains
    assert [n for n, p in start.named_parameters() if p.requires_grad] == ["proj"]
    with pytest.raises(ConfigError, match="lock_proj: needs model.text.freeze"):
        build_config("tiny-cpu", None, ["model.text.freeze=false", "model.text.lock_proj=true"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_should_trace_the_one_token_block_when_compiled(dtype):
    # aot_eager: dynamo + AOTAutograd graphs (what train.compile traces) without inductor's C++ build
    from clipjob.model.transformer import Transformer

    torch.manual_seed(0)
    t = Transformer(32, 2, 4, 4.0, "gelu", 1e-5, causal=True)
    x = torch.randn(3, 7, 32)
    index = torch.tensor([6, 2, 4])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        want = t(x, index).float()
        got = torch.compile(t, backend="aot_eager", fullgraph=True)(x, index).float()
    torch.testing.assert_close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    got.sum().backward()


def test_should_keep_every_real_token_when_trimming_padding():
    from clipjob.model.tokenizer import ClipTokenizer, trim_padding

    toks = ClipTokenizer(32)(["a cat", "an emoji of a smiling face with heart-shaped eyes!", "!"])
    got = trim_padding(toks)
    eot = toks.argmax(-1)
    assert got.shape[1] % 8 == 0 and int(eot.max()) < got.shape[1] < 32
    assert torch.equal(got, toks[:, :got.shape[1]]) and not toks[:, got.shape[1]:].any()
    assert trim_padding(toks, multiple=1).shape[1] == int(eot.max()) + 1
    full = torch.randint(1, 100, (2, 16))
    assert trim_padding(full) is full  # nothing to drop: the same tensor, no copy


def test_should_give_the_same_text_features_and_gradients_when_trimmed():
    from clipjob.model.tokenizer import ClipTokenizer, trim_padding

    torch.manual_seed(0)
    m = build_model(tiny().model).double()  # float64: equal up to summation order, not to fp32 rounding
    toks = ClipTokenizer(16)(["a red apple", "a dog", "an emoji of a tiger face"])
    short = trim_padding(toks, multiple=1)
    assert short.shape[1] < 16
    feats, grads = [], []
    for t in (toks, short):
        m.zero_grad()
        f = m.encode_text(t)
        (f * torch.arange(f.shape[1])).sum().backward()
        feats.append(f.detach())
        grads.append([p.grad.clone() for p in m.text.parameters()])
    torch.testing.assert_close(feats[0], feats[1], atol=1e-10, rtol=1e-10)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_should_give_the_same_minilm_features_and_cache_keys_when_trimmed():
    from clipjob.model.text import MiniLMText, MiniLMTokenizer
    from clipjob.model.tokenizer import trim_padding

    m = MiniLMText(build_config("tiny-cpu").model.text, 8).eval()
    toks = MiniLMTokenizer(32)(["a cat", "a dog wearing a tiny party hat"])
    short = trim_padding(toks, multiple=1)
    assert short.shape[1] < 32
    torch.testing.assert_close(m.embed(short), m.embed(toks), atol=1e-5, rtol=1e-5)
    m(toks)
    m(short)  # the same captions at another padded length hit the cache
    assert len(m._cache) == 2


def test_should_embed_uncached_minilm_captions_in_chunks_cut_to_their_own_length():
    from clipjob.model.text import MiniLMText, MiniLMTokenizer

    m = MiniLMText(build_config("tiny-cpu").model.text, 8).double().eval()  # float64: equal up to summation order
    words = "a very small red emoji of a cat with a hat and a tiny dog on a green hill".split()
    texts = [" ".join(words[:1 + i % len(words)]) for i in range(2 * m.CHUNK + 7)]  # 1-19 words, each 3-4 times
    toks = MiniLMTokenizer(24)(texts)
    seen: list[int] = []
    embed = m.embed
    m.embed = lambda t: (seen.append(t.shape[1]), embed(t))[1]
    got = m._cached_embed(toks)
    want = embed(toks).float()  # every caption padded to the batch's longest, in one go
    # each caption computed once, shortest first, each chunk only as long as its longest caption
    assert len(m._cache) == len(set(texts)) == len(words) and seen == [int((toks != 0).sum(1).max())]
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    m._cache.clear()
    m.CHUNK = 4
    seen.clear()
    torch.testing.assert_close(m._cached_embed(toks), want, atol=1e-7, rtol=0)
    assert len(seen) == 5 and seen == sorted(seen) and seen[0] < seen[-1] == int((toks != 0).sum(1).max())
    m.CACHE_MAX = 20  # 19 cached: a batch of cached captions leaves the cache as it is ...
    torch.testing.assert_close(m._cached_embed(toks[:3]), want[:3], atol=1e-7, rtol=0)
    assert len(m._cache) == 19 and len(seen) == 5
    more = MiniLMTokenizer(24)(["a blue fish", "a blue fish", "two blue fish", "a red emoji"])
    # ... and one whose new captions do not fit starts it over, then still answers every caption of the batch
    torch.testing.assert_close(m._cached_embed(torch.cat([toks[:1], more])), embed(torch.cat([toks[:1], more])).float(),
                               atol=1e-7, rtol=0)
    assert len(m._cache) == 4 and len(seen) == 6


def test_should_build_the_same_zero_shot_classifier_when_trimming_prompts():
    from clipjob.eval.zeroshot import GENERIC_TEMPLATES, text_classifier
    from clipjob.model.tokenizer import ClipTokenizer

    m = build_model(tiny().model).double().eval()
    args = (m, ClipTokenizer(16), ["apple", "tiger", "sailboat"], GENERIC_TEMPLATES, torch.device("cpu"))
    torch.testing.assert_close(text_classifier(*args, trim=True), text_classifier(*args, trim=False),
                               atol=1e-10, rtol=1e-10)
