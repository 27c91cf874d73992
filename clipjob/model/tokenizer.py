"""OpenAI CLIP byte-level BPE tokenizer on the HF `tokenizers` (Rust) engine, id-for-id equal to open_clip's.

Pipeline (same as open_clip's default `SimpleTokenizer`, clean="lower"):
  clean:    ftfy.fix_text -> html.unescape twice -> strip -> collapse whitespace -> lowercase   (Python)
  split:    the CLIP word regex, with the `regex` module like the reference, so Unicode classes agree (Python)
  BPE:      byte-level alphabet + the 48,894 merges of bpe_simple_vocab_16e6, "</w>" marks word ends (Rust)
  frame:    [SOT] + ids + [EOT], truncated to context_length with EOT forced last, right-padded with 0.
Vocab: 256 byte symbols, the same with "</w>", the merges, then SOT (49406) and EOT (49407): 49408 ids.

`clean_caption` is the separate CoreNet-style clean-up of raw web captions (URL-unquote, '+', HTML tags).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from clipjob.errors import ClipjobError

VOCAB_SIZE = 49408
SOT_TOKEN = "<start_of_text>"  # open_clip's spelling; OpenAI's is <|startoftext|>, same id
EOT_TOKEN = "<end_of_text>"
PAD_ID = 0
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894 of the file's merges are used
_MERGES_PACKAGE, _MERGES_FILE = "clip", "bpe_simple_vocab_16e6.txt.gz"

# CLIP's word pattern: special tokens, English contractions, letter runs, single digits, other-symbol runs.
# Same engine (`regex`) and flags as the reference, so Unicode classes and case folding agree exactly.
_WORD_RE = regex.compile(
    f"{SOT_TOKEN}|{EOT_TOKEN}" + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_HTML_TAG_RE = re.compile(r"<[^>\n]*>")  # CoreNet's non-greedy "<.*?>", which never crosses a newline


def clean_caption(text: str) -> str:
    """CoreNet-style clean-up of a raw web caption: URL-unquote, '+' to space, drop HTML tags, collapse spaces."""
    text = urllib.parse.unquote(text).replace("+", " ")
    text = _HTML_TAG_RE.sub("", text)
    return " ".join(text.split())


def clean_text(text: str) -> str:
    """open_clip's default text cleaning: ftfy, HTML-unescape twice, strip, collapse whitespace, lowercase."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        # Printable ASCII without '&' is a fixed point of ftfy.fix_text and html.unescape: skip both (~40 us).
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def merges_path() -> Path:
    """Where the OpenAI merges file that clip-anytorch ships lies. The package is located, not imported:
    importing `clip` pulls in torchvision and, on recent setuptools, fails on pkg_resources."""
    spec = importlib.util.find_spec(_MERGES_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / _MERGES_FILE
        if path.is_file():
            return path
    raise ClipjobError(
        f"CLIP BPE merges file {_MERGES_PACKAGE}/{_MERGES_FILE} not found: install it with `pip install clip-anytorch`"
    )


def _byte_symbols() -> dict[int, str]:
    """GPT-2/CLIP byte -> symbol table, in vocab order: printable Latin-1 bytes stand for themselves, the
    other 68 bytes (controls, space, NBSP, soft hyphen) follow, taking the code points 256.. in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in set(printable)]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


_BYTE_OF_SYMBOL = {symbol: b for b, symbol in _byte_symbols().items()}


@functools.lru_cache(maxsize=1)
def build_bpe_tokenizer() -> Tokenizer:
    """The CLIP BPE as a `tokenizers.Tokenizer` that takes pre-split words; built once per process."""
    with gzip.open(merges_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : _NUM_MERGES + 1]  # line 0 is the "#version" header
    merges = [tuple(line.split()) for line in lines]
    alphabet = list(_byte_symbols().values())
    symbols = alphabet + [s + "</w>" for s in alphabet] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {s: i for i, s in enumerate(symbols)}
    if len(symbols) != VOCAB_SIZE or len(vocab) != VOCAB_SIZE:
        raise ClipjobError(f"{merges_path()} is not the CLIP merges file: {len(vocab)} vocab entries, not {VOCAB_SIZE}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", fuse_unk=False))
    # Words arrive split by _WORD_RE; ByteLevel only maps their UTF-8 bytes to the alphabet (no regex, no prefix).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A word equal to a special token (only _WORD_RE's special alternatives yield one) maps to its id.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (SOT_TOKEN, EOT_TOKEN)])
    return tok


def split_words(text: str) -> list[str]:
    """Clean `text` and cut it into the words the BPE runs on."""
    return _WORD_RE.findall(clean_text(text))


def trim_padding(tokens: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """`tokens` without the trailing columns that are padding in every row, rounded up to a multiple of
    `multiple` columns (fewer shapes for torch.compile and the GPU kernels).

    Every row ends with its EOT (CLIP) or [SEP] (MiniLM), neither of which is PAD_ID, so only columns after
    every row's last real token go. Both text towers give the same features on the trimmed batch: the CLIP
    tower is causal and pools the EOT token, MiniLM masks padding. Captions are mostly far shorter than the
    context (emoji captions ~8 of 32 tokens; web captions ~15-20 of 77), so this skips most of the text
    tower's work. Call it on the host, before the copy to the device (it reads the values)."""
    used = tokens.ne(PAD_ID).any(0).nonzero()
    n = int(used[-1]) + 1 if len(used) else 1
    n = min(tokens.shape[1], -(-n // multiple) * multiple)
    return tokens[:, :n] if n < tokens.shape[1] else tokens


class ClipTokenizer:
    """Texts -> LongTensor [N, context_length]: SOT, BPE ids, EOT (forced last when truncated), then zeros."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ClipjobError(f"tokenizer context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        self.context_length = context_length
        self._tok = build_bpe_tokenizer()
        self.vocab_size = self._tok.get_vocab_size()
        self.sot_token_id = self._tok.token_to_id(SOT_TOKEN)
        self.eot_token_id = self._tok.token_to_id(EOT_TOKEN)
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking, which is not needed here.
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without SOT/EOT and without truncation."""
        return self._tok.encode(split_words(text), is_pretokenized=True, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text back from ids, up to the first EOT (padding shares id 0 with "!", so it is cut, not filtered)."""
        ids = list(ids)
        ids = ids[: ids.index(self.eot_token_id)] if self.eot_token_id in ids else ids
        symbols = "".join(self._tok.id_to_token(i) for i in ids if i != self.sot_token_id)
        data = bytes(_BYTE_OF_SYMBOL[c] for c in symbols)  # "</w>" is printable ASCII: it survives as is
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        words = [split_words(t) for t in texts]
        encodings = self._encode_batch(words, is_pretokenized=True, add_special_tokens=False)
        keep = self.context_length - 2
        out = np.full((len(words), self.context_length), PAD_ID, dtype=np.int64)  # filling numpy rows is ~10x
        for i, e in enumerate(encodings):  # faster than torch.tensor on a list of lists
            ids = e.ids[:keep]
            out[i, 0], out[i, 1 : len(ids) + 1], out[i, len(ids) + 1] = self.sot_token_id, ids, self.eot_token_id
        return torch.from_numpy(out)
