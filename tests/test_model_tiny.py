"""The whole model on a tiny random config (window 8): cache wrap, chunked prefill, backends, transformers."""

from __future__ import annotations

import pytest
import torch

from gemma3_fast import ops, reference_ops
from gemma3_fast.loading import load_model_and_tokenizer
from tests.conftest import TINY_WINDOW

BACKENDS = ["reference"] + (["extension"] if ops.EXTENSION_AVAILABLE else [])
N = 3 * TINY_WINDOW + 5  # a prompt several windows long


def prompt(n=N, seed=0):
    return torch.randint(6, 300, (n,), generator=torch.Generator().manual_seed(seed))


def load_tiny(folder, backend="reference", dtype="float32"):
    return load_model_and_tokenizer(folder, dtype, "cpu", backend)[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3, TINY_WINDOW, 13])
def test_chunked_prefill_equals_one_shot_and_no_cache(tiny_folder, backend, chunk):
    model = load_tiny(tiny_folder, backend)
    ids = prompt()
    with torch.inference_mode():
        full = model(ids, torch.arange(N), None, all_logits=True)
    one_shot = model.prefill(ids, model.new_cache(N), 0, all_logits=True)
    chunked = model.prefill(ids, model.new_cache(N), chunk, all_logits=True)
    torch.testing.assert_close(one_shot, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_across_window_edges_matches_full_forward(tiny_folder, backend):
    """Prefill 3 tokens, then decode one at a time through positions window-1, window, window+1 and several
    ring wraps: every step's logits equal a cache-free forward of the whole sequence."""
    model = load_tiny(tiny_folder, backend)
    ids = prompt()
    with torch.inference_mode():
        full = model(ids, torch.arange(N), None, all_logits=True)
    cache = model.new_cache(N)
    steps = [model.prefill(ids[:3], cache)]
    for i in range(3, N):
        steps.append(model.decode(ids[i:i + 1], cache))
    assert cache.seq_len == N
    torch.testing.assert_close(torch.cat(steps), full[2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")])
def test_decode_session_steps_equal_model_decode(tiny_folder, backend, dtype, quantize):
    """A decode session (what generation runs; from C++ on the extension) is model.decode: the same logits and
    cache contents, bit for bit, step after step through the window edges and several ring wraps, its greedy
    step is the argmax, and its steps mix with model.decode on one cache (positions come from cache.seq_len)."""
    model = load_model_and_tokenizer(tiny_folder, dtype, "cpu", backend, quantize=quantize)[0]
    ids = prompt()
    by_decode, by_session = model.new_cache(N), model.new_cache(N)
    model.prefill(ids[:3], by_decode)
    model.prefill(ids[:3], by_session)
    session = model.decode_session(by_session)
    assert (session._native is not None) == (backend == "extension")  # the C++ steps where there are kernels
    for i in range(3, N):
        expected = model.decode(ids[i:i + 1], by_decode)
        if i % 3 == 0:
            assert session.greedy(int(ids[i])) == int(model.ops.argmax(expected))
        elif i % 3 == 1:
            assert torch.equal(session.logits(int(ids[i])), expected)
        else:  # the session's cache advanced by model.decode itself
            assert torch.equal(model.decode(ids[i:i + 1], by_session), expected)
        assert by_session.seq_len == by_decode.seq_len == i + 1
    for got, want in zip(by_session.k + by_session.v, by_decode.k + by_decode.v):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=f"{N} cached \\+ 1 new tokens exceed the KV cache of {N}"):
        session.greedy(7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_session_bad_token_is_a_clear_error(tiny_folder, backend):
    model = load_tiny(tiny_folder, backend)
    cache = model.new_cache(8)
    model.prefill(prompt(3), cache)
    session = model.decode_session(cache)
    vocab = model.config.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=f"token {bad} is not a token id: the vocabulary has {vocab} entries"):
            session.greedy(bad)
    assert cache.seq_len == 3  # a refused step does not advance
    if backend == "extension":  # the C++ session checks too, and its errors come without a C++ backtrace
        with pytest.raises(RuntimeError) as err:
            session._native.greedy(vocab, 3)
        assert f"ids[0] = {vocab} is not a token id: the embedding has {vocab} rows" in str(err.value)
        assert "Exception raised from" not in str(err.value)
        with pytest.raises(RuntimeError, match="position must be >= 0, got -2"):
            session._native.logits(5, -2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_weights_are_used_not_stale_ones(tiny_folder, backend):
    """The model gathers its blocks' op arguments once and reuses them while the same objects are in place: a
    replaced weight, norm or whole projection must be picked up by the next forward."""
    model, fresh = load_tiny(tiny_folder, backend), load_tiny(tiny_folder, backend)
    ids = prompt(12)
    with torch.inference_mode():
        before = model(ids, torch.arange(12), None, all_logits=True)
        g = torch.Generator().manual_seed(1)
        for m in (model, fresh):  # the same three swaps on both; `fresh` has never run a forward
            block = m.layers[1]
            block.o_proj.weight = torch.nn.Parameter(torch.randn(block.o_proj.weight.shape, generator=g) * 0.1)
            block.post_ff_norm = torch.nn.Parameter(torch.randn(block.post_ff_norm.shape, generator=g))
            new_proj = type(m.layers[2].down_proj)(*m.layers[2].down_proj.weight.shape[::-1])
            new_proj.weight = torch.nn.Parameter(torch.randn(new_proj.weight.shape, generator=g) * 0.1)
            m.layers[2].down_proj = new_proj
            g.manual_seed(1)
        after = model(ids, torch.arange(12), None, all_logits=True)
        expected = fresh(ids, torch.arange(12), None, all_logits=True)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, expected, atol=0, rtol=0)


def test_no_tensor_grows_during_decoding(tiny_folder):
    model = load_tiny(tiny_folder)
    cache = model.new_cache(N)
    ptrs = [(k.data_ptr(), k.shape) for k in cache.k]
    assert [k.shape[0] for k in cache.k] == [TINY_WINDOW, TINY_WINDOW, N, TINY_WINDOW]  # rings and a full cache
    model.prefill(prompt()[:5], cache)
    for i in range(N - 5):
        model.decode(torch.tensor([7]), cache)
    assert [(k.data_ptr(), k.shape) for k in cache.k] == ptrs
    with pytest.raises(ValueError, match="exceed the KV cache"):
        model.decode(torch.tensor([7]), cache)


@pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extension_matches_reference_model(tiny_folder, dtype):
    ext, ref = load_tiny(tiny_folder, "extension", dtype), load_tiny(tiny_folder, "reference", dtype)
    ids = prompt()
    out_ext = ext.prefill(ids, ext.new_cache(N), 5, all_logits=True).float()
    out_ref = ref.prefill(ids, ref.new_cache(N), 5, all_logits=True).float()
    tol = 1e-4 if dtype == "float32" else 0.15 * out_ref.abs().max().item()
    torch.testing.assert_close(out_ext, out_ref, atol=tol, rtol=0)
    if dtype == "float32":
        assert torch.equal(out_ext.argmax(-1), out_ref.argmax(-1))


def test_matches_transformers_on_tiny_random_weights(tiny_folder):
    """Config mapping, weight names, norms, window and both RoPE bases against the oracle (no real weights)."""
    from transformers import Gemma3ForCausalLM

    hf = Gemma3ForCausalLM.from_pretrained(tiny_folder, torch_dtype=torch.float32, attn_implementation="eager")
    ours = load_tiny(tiny_folder, BACKENDS[-1])
    ids = prompt()
    with torch.inference_mode():
        expected = hf(ids[None]).logits[0]
    got = ours.prefill(ids, ours.new_cache(N), 0, all_logits=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
def test_torch_compile_fullgraph_decode_step(tiny_folder):
    """The custom ops have fake kernels, so a decode step compiles as one graph and gives the eager result."""
    model = load_tiny(tiny_folder, "extension")
    ids = prompt(12)
    cache_eager, cache_compiled = model.new_cache(16), model.new_cache(16)
    model.prefill(ids, cache_eager)
    model.prefill(ids, cache_compiled)
    step = torch.compile(model.forward, fullgraph=True, dynamic=False)
    tok, pos = torch.tensor([42]), torch.tensor([12])
    with torch.inference_mode():
        eager = model(tok, pos, cache_eager)
        compiled = step(tok, pos, cache_compiled)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache_compiled.k[0], cache_eager.k[0])  # the in-place cache write happened


@pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_model_extension_matches_reference(tiny_folder, dtype):
    """--quantize int8: every linear and the head become int8 + scales, and the int8 head is the embedding table
    too (no full-precision copy left); activations stay in the model dtype; both backends agree, and the result
    stays close to the unquantized model."""
    ext, _ = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "extension", quantize="int8")
    ref, _ = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "reference", quantize="int8")
    full = load_tiny(tiny_folder, "reference", dtype)
    assert ext.lm_head.weight.dtype == torch.int8 and ext.layers[0].qkv_proj.weight.dtype == torch.int8
    assert ext.embed_tokens.weight is ext.lm_head.weight and ext.dtype == getattr(torch, dtype)
    vocab_rows = ext.config.vocab_size * ext.config.hidden_size
    assert all(p.numel() < vocab_rows for p in ext.parameters() if p.dtype != torch.int8)
    ids = prompt()
    a = ext.prefill(ids, ext.new_cache(N), 4, all_logits=True).float()
    b = ref.prefill(ids, ref.new_cache(N), 4, all_logits=True).float()
    c = full.prefill(ids, full.new_cache(N), 4, all_logits=True).float()
    scale = c.abs().max().item()
    assert (a - b).abs().max().item() <= (0.02 if dtype == "float32" else 0.1) * scale
    assert (a - c).abs().max().item() <= 0.1 * scale


@pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_embedding_lookup_matches_reference(tiny_folder, dtype):
    """The int8 table's lookup: the kernel's first-layer input is the reference's (row times its scale times
    embed_scale, rounded once), seen through the all-logits forward, the batched step and the decode session;
    head_scales missing is a clear error in both."""
    model, _ = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "extension", quantize="int8")
    ids = prompt()
    pos = torch.arange(len(ids))
    with torch.inference_mode():
        a = model(ids, pos, None, all_logits=True)
        model.set_backend("reference")
        b = model(ids, pos, None, all_logits=True)
        model.set_backend("extension")
    assert a.dtype == b.dtype == getattr(torch, dtype)
    # up to its limit the int8 decode kernel (int16 activations) runs the projections, past it the matmul
    kernel = len(ids) <= ops.native_module().gemv_token_limit(model.lm_head.weight)
    tol = (1e-4 if kernel else 1e-5) if dtype == "float32" else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol * b.abs().max().item(), rtol=0)
    tol = 1e-4 if dtype == "float32" else 2e-2  # one-token steps: the int8 kernel's int16 activations
    caches = [model.new_cache(N) for _ in range(2)]
    with torch.inference_mode():
        step = model.batched_session(caches).logits([int(ids[0]), int(ids[1])], [0, 1])
    torch.testing.assert_close(step[0].float(), b[0].float(), atol=tol * b.abs().max().item(), rtol=0)
    with torch.inference_mode():
        first = model.decode_session(model.new_cache(N)).logits(int(ids[0]))
    torch.testing.assert_close(first.reshape(-1).float(), b[0].float(), atol=tol * b.abs().max().item(), rtol=0)
    args = (ids, pos, model.embed_tokens.weight, model.embed_scale(), model.layers[0].input_norm,
            model.inv_freq_local, model.inv_freq_global, [], [], [], [], [], [], [], model.lm_head.weight, None, 4,
            1.0, 1e-6, False, False)
    for fn in (torch.ops.gemma3_fast.decoder_forward, reference_ops.decoder_forward):
        with pytest.raises((RuntimeError, ValueError), match="head_scales"):
            fn(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_matches_cpu(tiny_folder):
    """On a GPU the ops run their PyTorch reference (no CUDA kernels are built): same logits as the CPU."""
    cpu = load_tiny(tiny_folder, "auto")
    gpu = load_model_and_tokenizer(tiny_folder, "float32", "cuda", "auto")[0]
    ids = prompt()
    a = cpu.prefill(ids, cpu.new_cache(N), 5, all_logits=True)
    b = gpu.prefill(ids.cuda(), gpu.new_cache(N), 5, all_logits=True).cpu()
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
