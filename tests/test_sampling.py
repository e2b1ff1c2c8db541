"""Sampling: the draw, the top-p nucleus (topk candidates before a full sort), and sample() with its filters."""

from __future__ import annotations

import pytest
import torch

from gemma3_fast.sampling import SamplingParams, draw, sample, top_p_filter


def test_draw_follows_the_weights_and_never_picks_a_zero():
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0, 6.0, 0.0])  # unnormalized on purpose
    counts = torch.bincount(torch.tensor([draw(weights, g) for _ in range(20000)]), minlength=6)
    freq = counts / counts.sum()
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq, weights / weights.sum(), atol=0.015, rtol=0)
    assert {draw(torch.tensor([0.0, 0.0, 2.0]), g) for _ in range(50)} == {2}  # the last index, never past it


@pytest.mark.parametrize("spread,nucleus", [(8.0, (1, 1024)), (3.0, (1024, 16384)), (1.5, (16384, 262144))])
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_top_p_filter_equals_the_full_sort(spread, nucleus, top_p):
    """The nucleus from topk candidates (1024, then 16384) is the one a full sort gives, bit for bit; the spreads
    put it within the first candidates, the second, and past both (the full sort)."""
    probs = torch.softmax(torch.randn(262144, generator=torch.Generator().manual_seed(1)) * spread, -1)
    kept, order = top_p_filter(probs, top_p)
    sorted_p, sorted_ids = torch.sort(probs, descending=True)
    expected = torch.zeros_like(probs).scatter(0, sorted_ids, sorted_p.masked_fill(
        (sorted_p.cumsum(-1) - sorted_p) >= top_p, 0.0))
    got = torch.zeros_like(probs).scatter(0, order, kept)
    assert torch.equal(got, expected)
    if top_p == 0.9:
        assert nucleus[0] <= int((got > 0).sum()) < nucleus[1]


def test_sample_draws_from_the_filtered_distribution():
    """temperature, top-k, min-p and top-p together: sample()'s frequencies match the distribution the filters
    define, computed here from their definitions."""
    logits = torch.tensor([2.0, 1.0, 0.5, 3.0, -1.0, 2.5, 0.0, 1.5])
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05)
    p = torch.softmax(logits / 0.7, -1)
    p[logits < torch.topk(logits, 6).values[-1]] = 0  # top-k: the 6 largest logits
    p = torch.softmax((logits / 0.7).masked_fill(p == 0, float("-inf")), -1)
    p[p < 0.05 * p.max()] = 0  # min-p
    order = torch.argsort(p, descending=True)
    mass_before = p[order].cumsum(-1) - p[order]
    p[order[mass_before >= 0.9]] = 0  # top-p
    expected = p / p.sum()
    g = torch.Generator().manual_seed(2)
    counts = torch.bincount(torch.tensor([sample(logits, params, None, g) for _ in range(20000)]), minlength=8)
    assert counts[expected == 0].sum() == 0
    torch.testing.assert_close(counts / counts.sum(), expected, atol=0.015, rtol=0)
