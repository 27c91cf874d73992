"""eval/retrieval.py: recall@K in both directions on hand-built embeddings (known answers), duplicate captions,
ties, NaN, and the chunked similarity giving the same ranks as the whole matrix."""

from __future__ import annotations

import pytest
import torch

from clipjob.eval.retrieval import caption_index, format_retrieval, recall_at_k


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_should_give_each_direction_its_own_recall_when_one_image_prefers_another_caption():
    """Image 2 scores caption 0 above its own (a miss at 1, a hit at 5); as a query, caption 2 still finds
    image 2 first, so text->image recall@1 is 100 while image->text recall@1 is 2/3."""
    texts = torch.eye(3)
    images = _unit([1, 0, 0], [0, 1, 0], [1, 0, 0.5])
    r = recall_at_k(images, texts, torch.tensor([0, 1, 2]))
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r5"] == 100.0 and r["i2t_r10"] == 100.0
    assert r["t2i_r1"] == 100.0 and r["t2i_r5"] == 100.0


def test_should_rank_past_more_wrong_items_when_k_grows():
    """Seven captions; image 0's own caption is 6th by score: a miss at 1 and 5, a hit at 10."""
    images = _unit([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0], [0, 1, 0, 0, 0, 0, 0])
    r = recall_at_k(images, torch.eye(7), torch.tensor([0, 1]))
    assert (r["i2t_r1"], r["i2t_r5"], r["i2t_r10"]) == (50.0, 50.0, 100.0)


def test_should_count_a_hit_when_any_image_of_a_shared_caption_is_retrieved():
    """Captions 'a dog', 'a dog', 'a cat' (tokens) are two distinct captions, 0 and 1. Image->text: the first
    dog picture prefers 'a cat' (a miss), the others their own. 'a dog' as a query: the cat picture first (0.7),
    then the second dog picture (0.6), then the first (0.3): the best correct image is 2nd, a hit at 2, not 1."""
    distinct, index = caption_index(torch.tensor([[7, 3, 9, 0], [7, 3, 9, 0], [7, 4, 9, 0]]))
    assert distinct.tolist() == [[7, 3, 9, 0], [7, 4, 9, 0]] and index.tolist() == [0, 0, 1]
    texts = _unit([1, 0, 0], [0, 1, 0])
    images = _unit([0.3, 0.5, 0.81], [0.6, 0, 0.8], [0.7, 0.714, 0])
    r = recall_at_k(images, texts, index, ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(200 / 3) and r["i2t_r2"] == 100.0
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r5"]) == (50.0, 100.0, 100.0)  # two queries: 'a cat' hits at 1


def test_should_score_indistinguishable_images_at_chance_when_they_tie():
    """Two identical pictures with different captions: each caption as a query ties the two images; the earlier
    image wins the tie, so one of the two queries hits at 1 (chance), neither all nor none."""
    images = _unit([1, 0], [1, 0])
    texts = _unit([1, 0], [1, 1])
    r = recall_at_k(images, texts, torch.tensor([0, 1]))
    assert r["t2i_r1"] == 50.0 and r["t2i_r5"] == 100.0
    collapsed = recall_at_k(torch.ones(4, 2) / 2**0.5, torch.ones(4, 2) / 2**0.5, torch.arange(4))
    assert collapsed["i2t_r1"] == 25.0 and collapsed["t2i_r1"] == 25.0  # constant features: chance, not 100


def test_should_rank_an_image_last_when_its_features_are_nan():
    """Caption 0's own image is NaN: it comes after both finite images (a miss at 1), not first."""
    images = torch.cat([torch.full((1, 2), float("nan")), _unit([0, 1], [1, 1])])
    r = recall_at_k(images, _unit([1, 0], [0, 1], [1, 1]), torch.arange(3))
    assert r["t2i_r1"] == pytest.approx(200 / 3) and r["t2i_r5"] == 100.0


@pytest.mark.parametrize("chunk_elems", [1, 7, 64])
def test_should_give_the_whole_matrix_ranks_when_the_similarity_is_chunked(chunk_elems):
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(25, 8), dim=-1)
    index = torch.randint(0, 25, (40,))
    whole = recall_at_k(images, texts, index, chunk_elems=10**9)
    assert recall_at_k(images, texts, index, chunk_elems=chunk_elems) == whole
    assert 0 < whole["i2t_r5"] < 100 and whole["i2t_r1"] <= whole["i2t_r5"] <= whole["i2t_r10"]


def test_should_print_recall_in_both_directions_when_a_result_has_retrieval():
    r = {"i2t_r1": 12.5, "i2t_r5": 50.0, "i2t_r10": 75.0, "t2i_r1": 10.0, "t2i_r5": 40.0, "t2i_r10": 80.0}
    assert format_retrieval(r) == "retrieval R@1/5/10 image->text 12.50/50.00/75.00%  text->image 10.00/40.00/80.00%"
    assert format_retrieval({"top1": 3.0}) == ""
