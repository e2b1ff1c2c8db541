"""Weights moved into the huge-page arena: same values, ties kept, outputs unchanged, opt-out honoured."""

from __future__ import annotations

import mmap

import pytest
import torch

from gemma3_fast import huge_pages
from gemma3_fast.huge_pages import HUGE_PAGE, huge_page_buffer, place_on_huge_pages
from gemma3_fast.loading import load_model_and_tokenizer

pytestmark = pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="madvise(MADV_HUGEPAGE) is Linux-only")


def test_buffer_is_aligned_writable_and_sized():
    buf = huge_page_buffer(3 * HUGE_PAGE + 5)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * HUGE_PAGE + 5
    assert buf.data_ptr() % HUGE_PAGE == 0
    buf.fill_(7)
    assert int(buf[-1]) == 7 and int(buf.sum()) == 7 * buf.numel()


def test_buffer_rejects_empty_size():
    with pytest.raises(ValueError, match="nbytes must be > 0"):
        huge_page_buffer(0)


def test_buffer_outlives_its_mapping_reference():
    """The mmap object is only referenced by the tensor: dropping everything else must not unmap it."""
    t = huge_page_buffer(HUGE_PAGE).view(torch.float32)
    t.fill_(1.5)
    view = t[10:20]
    del t
    torch.ones(64 << 20).sum()  # churn memory: an unmapped region would now fault or read foreign data
    assert torch.equal(view, torch.full((10,), 1.5))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_moved_in_place_keeps_values_ties_and_outputs(tiny_folder, dtype):
    model = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "reference")[0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.arange(5, 17)
    with torch.inference_mode():
        expected = model(ids, torch.arange(len(ids)), None, all_logits=True)
    arena_bytes = place_on_huge_pages(model, min_bytes=0)
    assert arena_bytes > 0
    ptrs = sorted(p.data_ptr() for p in model.parameters())
    assert ptrs[0] % HUGE_PAGE == 0 and ptrs[-1] - ptrs[0] < arena_bytes  # one arena, starting on a huge page
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied: one tensor, moved once
    with torch.inference_mode():
        torch.testing.assert_close(model(ids, torch.arange(len(ids)), None, all_logits=True), expected,
                                   atol=0, rtol=0)


def test_int8_scales_and_weights_moved(tiny_folder):
    model = load_model_and_tokenizer(tiny_folder, "float32", "cpu", "reference", quantize="int8")[0]
    w, s = model.layers[0].qkv_proj.weight, model.layers[0].qkv_proj.scales
    w0, s0 = w.clone(), s.clone()
    place_on_huge_pages(model, min_bytes=0)
    assert w.dtype == torch.int8 and torch.equal(w, w0) and torch.equal(s, s0)


def test_opt_out_leaves_the_model_alone(tiny_folder, monkeypatch):
    monkeypatch.setenv("GEMMA3_FAST_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    model = load_model_and_tokenizer(tiny_folder, "float32", "cpu", "reference")[0]
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert place_on_huge_pages(model, min_bytes=0) == 0
    assert [p.data_ptr() for p in model.parameters()] == ptrs
