"""clipjob/model/tokenizer.py: id-for-id parity with open_clip's SimpleTokenizer, framing, clean_caption."""

from __future__ import annotations

import random

import open_clip  # the reference (dev extra); a missing one must fail the suite, not skip it
import pytest
import torch

from clipjob.errors import ClipjobError
from clipjob.model import tokenizer as tokmod
from clipjob.model.tokenizer import ClipTokenizer, clean_caption

# Fragments by kind; the corpus below mixes them deterministically.
ENGLISH = ("a photo of a dog", "The Quick Brown Fox jumps over the lazy dog", "Vintage poster, 1960s",
           "close-up of a red rose on a wooden table", "New York City skyline at night (HDR)",
           "stock photo - woman holding umbrella", "Best Wedding Dress Ideas 2019 | Pinterest",
           "aerial view of the beach; sunset", "illustration: vector logo design", "kite (bird of prey)")
UNICODE = ("café naïve résumé façade", "Ñandú pingüino ÅÄÖ øæ", "Straße ß ẞ", "東京タワーの夜景", "北京烤鸭 漢字",
           "ひらがな カタカナ", "한국어 텍스트", "🐶🐱 dog+cat 🎉🎉🎉", "👩‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "👍🏽 ok",
           "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "ΟΔΥΣΣΕΥΣ Ὀδυσσεύς", "नमस्ते दुनिया", "สวัสดีครับ",
           "e\u0301 combining accent", "ﬁne ﬂower ligatures", "ＡＢＣ fullwidth １２３", "İstanbul ıi", "ſ long s 'ſ",
           "\u212a kelvin", "zero\u200bwidth", "\ufeffbom", "soft\xadhyphen", "«guillemets» „quotes“ ‘single’",
           "em—dash – en", "…ellipsis", "µ mu Ω ohm", "math ∑∫√∞ ≤≥", "½ ¼ ² ³ Ⅻ ٣٤ ๕", "tab\tand\nnewline",
           "nbsp\xa0here", "ideographic\u3000space", "\x85next line", "ctrl\x00\x07\x0b\x1b[31mred\x1c\x7f",
           "\U0001d400\U0001d401 math bold", "\U00020000 rare cjk", "a\u0300\u0301\u0302 stacked")
PUNCT = ("Hello, World!!!", "wait... what?!", "(parentheses) [brackets] {braces}", "$19.99 @ 50% off #sale",
         "a/b\\c|d_e-f+g=h", "***bold*** __under__", "~!@#$%^&*()", "<b>bold</b>", "C++ & C#", "'quoted'",
         "\"double\"", "--", "....", "!!??!!", "<start_of_text>", "x<end_of_text>y", "!<end_of_text>",
         "<START_OF_TEXT> upper", "<|endoftext|>", "<start_of_text<end_of_text>>")
NUMBERS = ("3.14159", "1,000,000", "2024-01-31", "12:30pm", "007", "1st 2nd 3rd 4th", "v2.0.1", "0x1F",
           "1e-9", "+44 20 7946 0958", "9780306406157")
HTML = ("&amp;", "Tom &amp; Jerry", "&amp;amp;amp;", "&lt;b&gt;bold&lt;/b&gt;", "it&#39;s", "&quot;hi&quot;",
        "a&nbsp;b", "&#x1F600;", "&eacute;t&eacute;", "&copy; 2020", "&bogus;", "AT&T", "fish &chips",
        "&#128512;&#128512;")
MOJIBAKE = ("cafÃ©", "donâ€™t stop", "Ã¢â‚¬â€œ", "â€œquotedâ€\x9d", "naÃ¯ve", "SchÃ¶ne GrÃ¼ÃŸe", "Ã©tÃ©",
            "ÐŸÑ€Ð¸Ð²ÐµÑ‚", "æ\x9d±äº¬", "Ã\xa0 la carte", "âœ” done")
URLS = ("https://example.com/path/to/page?q=1&x=2#frag", "http://www.foo.co.uk/a%20b+c",
        "www.example.org/index.html", "ftp://files.example.net/pub/file.tar.gz", "user@example.com",
        "https://t.co/AbC123xYz")
CONTRACTIONS = ("it's", "IT'S", "don't", "we'll", "they've", "I'm", "she'd", "you're", "o'clock",
                "rock'n'roll", "'ssss", "''s", "Jones' car", "can’t won’t", "'", "''", "'re'd'll'm")
WHITESPACE = ("", " ", "   ", "\t\n", "\u3000", "\xa0", "\n\n\n", " \t \r\n ")
ALL = ENGLISH + UNICODE + PUNCT + NUMBERS + HTML + MOJIBAKE + URLS + CONTRACTIONS + WHITESPACE
SEPARATORS = (" ", "  ", "", ", ", "\n", "\t", " - ", "&amp;", "+", "%20", "'s ", "'")


def _random_codepoints(rng: random.Random, n: int) -> str:
    """Random assigned-or-not code points (no surrogates), weighted toward the BMP."""
    out = []
    for _ in range(n):
        hi = rng.choice((0x7F, 0x24F, 0x2FFF, 0xD7FF, 0x10FFFF))
        cp = rng.randint(0x20, hi)
        out.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
    return "".join(out)


def make_corpus(n: int = 1500, seed: int = 1234) -> list[str]:
    """Every fragment alone, then deterministic mixes: short/long, cased, random code points, > 77 tokens."""
    rng = random.Random(seed)
    corpus = list(ALL)
    while len(corpus) < n:
        kind = rng.random()
        if kind < 0.15:
            text = _random_codepoints(rng, rng.randint(1, 40))
        elif kind < 0.25:  # long captions, well past 77 tokens
            text = " ".join(rng.choice(ALL) for _ in range(rng.randint(30, 120)))
        else:
            parts = [rng.choice(ALL) for _ in range(rng.randint(1, 8))]
            text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        if rng.random() < 0.2:
            text = rng.choice((str.upper, str.title, str.swapcase))(text)
        corpus.append(text)
    return corpus


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def corpus():
    return make_corpus()


@pytest.fixture(scope="module")
def ref_ids(reference, corpus):
    """open_clip's untruncated ids of every corpus string, computed once."""
    return [reference.encode(t) for t in corpus]


@pytest.fixture(scope="module")
def tok():
    return ClipTokenizer()


def test_corpus_covers_the_hard_cases(corpus, ref_ids):
    """Guard against a corpus too easy to catch anything: it must hold what the parity tests are about."""
    assert len(corpus) >= 1000 and len(set(corpus)) >= 1000
    assert make_corpus() == corpus  # deterministic
    lengths = [len(ids) for ids in ref_ids]
    assert sum(n > 75 for n in lengths) >= 50  # truncation
    assert sum(n == 0 for n in lengths) >= 5  # empty after cleaning
    assert sum(not t.isascii() for t in corpus) >= 500


def test_constants(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id, tok.context_length) == (49406, 49407, 77)
    assert tok.sot_token_id == tok.vocab_size - 2 and tok.eot_token_id == tok.vocab_size - 1


def test_batch_ids_equal_open_clip(tok, reference, corpus):
    ours, ref = tok(corpus), reference(corpus)
    assert ours.dtype == torch.long and ours.shape == (len(corpus), 77)
    bad = [corpus[i] for i in torch.nonzero((ours != ref).any(dim=1)).flatten().tolist()]
    assert not bad, f"{len(bad)} strings differ from open_clip, e.g. {bad[:5]!r}"


def test_encode_equals_open_clip_untruncated(tok, ref_ids, corpus):
    bad = [t for t, ids in zip(corpus, ref_ids) if tok.encode(t) != ids]
    assert not bad, f"{len(bad)} strings differ from open_clip, e.g. {bad[:5]!r}"


@pytest.mark.parametrize("context_length", [2, 5, 16, 100])
def test_other_context_lengths_equal_open_clip(reference, corpus, context_length):
    tok = ClipTokenizer(context_length)
    texts = corpus[-300:]
    assert torch.equal(tok(texts), reference(texts, context_length=context_length))


def test_framing_truncates_with_eot_last_and_pads_with_zero(tok):
    out = tok(["a photo of a cat", "dog " * 200, "", "   "])
    assert out[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and not out[0, 7:].any()
    assert out[1, 0] == 49406 and out[1, -1] == 49407 and (out[1, 1:-1] != 49407).all() and out[1].ne(0).all()
    assert out[2, :2].tolist() == [49406, 49407] and not out[2, 2:].any()
    assert torch.equal(out[2], out[3])
    assert torch.equal(tok("a photo of a cat"), out[:1])  # a single string is a batch of one
    assert tok([]).shape == (0, 77)


def test_decode_round_trips_cleaned_text(tok):
    assert tok.decode(tok("Hello, World! café 東京 🐶 it's")[0].tolist()) == "hello , world ! café 東京 🐶 it 's"
    assert tok.decode(tok("wow!!! 100%")[0].tolist()) == "wow !!! 1 0 0 %"


def test_mismatch_is_detected_when_cleaning_is_skipped(tok, reference, corpus, monkeypatch):
    """The parity tests can fail: dropping ftfy/html cleaning changes ids on this corpus."""
    texts = list(ALL)
    expected = reference(texts)
    assert torch.equal(tok(texts), expected)
    monkeypatch.setattr(tokmod, "clean_text", lambda text: " ".join(text.split()).lower())
    assert (tok(texts) != expected).any(dim=1).sum() >= 20


def test_context_length_below_two_is_rejected():
    with pytest.raises(ClipjobError, match="context_length must be >= 2"):
        ClipTokenizer(1)


def test_missing_merges_file_is_a_one_line_clipjob_error(monkeypatch):
    monkeypatch.setattr(tokmod, "_MERGES_PACKAGE", "no_such_package_clipjob")
    with pytest.raises(ClipjobError, match=r"bpe_simple_vocab_16e6\.txt\.gz not found: install .*clip-anytorch"):
        tokmod.merges_path()


def test_tokenizer_is_built_once_per_process():
    assert tokmod.build_bpe_tokenizer() is tokmod.build_bpe_tokenizer()
    assert ClipTokenizer(16)._tok is ClipTokenizer(77)._tok


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("A%20photo%20of%20a%20cat", "A photo of a cat"),
        ("red+car+on+the+street", "red car on the street"),
        ("<p>Nice <b>view</b></p> of the sea", "Nice view of the sea"),
        ("  many   spaces\n\nand\tlines  ", "many spaces and lines"),
        ("a%2Bb", "a b"),  # unquoted first, so an encoded '+' also becomes a space (as in CoreNet)
        ("100% cotton", "100% cotton"),  # a bare '%' is left alone
        ("x < y and y > z", "x z"),  # CoreNet's tag regex takes '< y and y >' as a tag
        ("a <b\nc> d", "a <b c> d"),  # a tag never spans a newline
        ("caf%C3%A9 &amp; cr%C3%A8me", "café &amp; crème"),  # HTML entities are the tokenizer's job
        ("", ""),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean
