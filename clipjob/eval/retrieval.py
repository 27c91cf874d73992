"""Zero-shot retrieval: image->text and text->image recall@K over the (image, caption) pairs of a shard set.

Pairs: sample i's image matches sample i's caption. Captions are compared as the model sees them: two
captions whose token sequences are equal (after the reader's whitespace normalisation and the tokenizer's
lowercasing and truncation to the context length) are one caption, embedded once. So
- image->text: each image is a query over the distinct captions; it has exactly one correct caption;
- text->image: each distinct caption is a query over the images; every image of a sample with that caption
  is correct, and the query counts as a hit at K when any of the K best images is correct.
Ranks: a query's rank is the number of wrong items scored above its best correct item; a wrong item with an
equal score ranks above it when it comes earlier in the set (as a stable sort orders them), so items the
model cannot tell apart land at chance, neither all hits nor all misses; NaN scores rank last. recall@K is
the percentage of queries with rank < K. The similarity matrix is never built whole: queries are scored in
chunks of at most `chunk_elems` similarities (50,000 x 50,000 fp32 would be 10 GB at once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipjob.model.tokenizer import trim_padding

RECALL_KS = (1, 5, 10)
CHUNK_ELEMS = 1 << 21  # similarities scored at once: 8 MB of fp32 scores, a few times that with the masks
TEXT_BATCH = 256  # captions per text-tower call


def caption_index(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct token rows, for each sample the index of its row): equal token sequences are one caption."""
    return torch.unique(tokens, dim=0, return_inverse=True)


@torch.no_grad()
def embed_captions(model, tokens: torch.Tensor, device: torch.device, trim: bool = True,
                   batch: int = TEXT_BATCH, check_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """(M, E) L2-normalised text features of M token rows, `batch` rows per text-tower call; `check_stop` is
    called before each call and may raise to abandon the work."""
    feats = []
    for i in range(0, len(tokens), batch):
        if check_stop:
            check_stop()
        chunk = tokens[i:i + batch]
        feats.append(model.encode_text((trim_padding(chunk) if trim else chunk).to(device)).float())
    return torch.nn.functional.normalize(torch.cat(feats), dim=-1)


def _ranks(queries: torch.Tensor, keys: torch.Tensor, correct_of: Callable[[slice], torch.Tensor],
           chunk_elems: int, check_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """For each query row, the number of wrong keys ranked above its best correct key (see the module doc).
    `correct_of(rows)` gives the (rows, K) boolean mask of correct keys for a slice of queries; `check_stop` is
    called before each chunk."""
    rows = max(1, chunk_elems // max(1, len(keys)))
    position = torch.arange(len(keys), device=keys.device)
    ranks = torch.empty(len(queries), dtype=torch.long, device=keys.device)  # filled in place: nothing small
    # outlives a chunk, so glibc's heap reuses each chunk's freed scores and masks (a list of per-chunk results
    # pinned them: +500 MB RSS over 20,000 x 20,000)
    for start in range(0, len(queries), rows):
        if check_stop:
            check_stop()
        part = slice(start, min(start + rows, len(queries)))
        with torch.autocast(keys.device.type, enabled=False):  # fp32 scores under a bf16 eval: fewer ties
            sims = torch.nan_to_num(queries[part].float() @ keys.float().T, nan=float("-inf"))
        correct = correct_of(part)
        best = torch.where(correct, sims, float("-inf")).amax(1, keepdim=True)
        tie = sims == best
        first = (tie & correct).byte().argmax(1, keepdim=True)  # the best correct key's position (first max)
        above = (sims > best) | (tie & (position < first))
        torch.sum(above & ~correct, 1, out=ranks[part])
    return ranks


def _recall(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    return {k: 100.0 * int((ranks < k).sum()) / len(ranks) for k in ks}


def recall_at_k(image_feats: torch.Tensor, text_feats: torch.Tensor, text_of_image: torch.Tensor,
                ks: tuple[int, ...] = RECALL_KS, chunk_elems: int = CHUNK_ELEMS,
                check_stop: Callable[[], None] | None = None) -> dict[str, float]:
    """Recall@K in % for both directions: `image_feats` (N, E), `text_feats` (M, E) (normalised: similarity is
    the dot product), `text_of_image` (N,) the index of each image's caption among the M texts. Keys
    i2t_r{K} (images as queries) and t2i_r{K} (the texts that caption some image, as queries)."""
    text_of_image = text_of_image.to(image_feats.device)
    texts = torch.arange(len(text_feats), device=image_feats.device)
    i2t = _ranks(image_feats, text_feats, lambda rows: text_of_image[rows, None] == texts[None], chunk_elems,
                 check_stop)
    queried = torch.unique(text_of_image)  # a text no image has can find nothing: not a query
    t2i = _ranks(text_feats[queried], image_feats, lambda rows: queried[rows, None] == text_of_image[None],
                 chunk_elems, check_stop)
    return {**{f"i2t_r{k}": v for k, v in _recall(i2t, ks).items()},
            **{f"t2i_r{k}": v for k, v in _recall(t2i, ks).items()}}


def retrieval_result(model, tokens: torch.Tensor, image_feats: torch.Tensor, device: torch.device,
                     trim: bool = True, check_stop: Callable[[], None] | None = None,
                     chunk_elems: int = CHUNK_ELEMS) -> dict:
    """The retrieval part of an eval result: `tokens` (N, L) the tokenised caption of each of the N images
    whose normalised features are `image_feats`."""
    distinct, index = caption_index(tokens)
    text_feats = embed_captions(model, distinct, device, trim, check_stop=check_stop)
    return {**recall_at_k(image_feats.float(), text_feats, index, chunk_elems=chunk_elems, check_stop=check_stop),
            "captions": len(distinct)}


def format_retrieval(r: dict) -> str:
    """`retrieval R@1/5/10 image->text a/b/c%  text->image d/e/f%`; '' when `r` has no retrieval."""
    ks = [k for k in RECALL_KS if f"i2t_r{k}" in r]
    if not ks:
        return ""

    def side(d: str) -> str:
        return "/".join(f"{r[f'{d}_r{k}']:.2f}" for k in ks)

    return f"retrieval R@{'/'.join(map(str, ks))} image->text {side('i2t')}%  text->image {side('t2i')}%"
