"""Batched decode (decoder_forward_batched, BatchedDecodeSession): several sequences, each at its own position
over its own KV cache, stepped together. The contract: every row is, bit for bit, the step that sequence gets
alone (batch-invariance), and each cache ends as a batch-1 decode leaves it."""

from __future__ import annotations

import pytest
import torch

from gemma3_fast import ops, reference_ops
from gemma3_fast.loading import load_model_and_tokenizer
from tests.conftest import TINY_WINDOW
from tests.test_gguf_native import write_tiny_gguf

BACKENDS = ["reference"] + (["extension"] if ops.EXTENSION_AVAILABLE else [])
needs_ext = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
# Prompt lengths: an empty cache (first step at position 0), inside the window, at its edge, past it (ring wrap)
# and several windows long. 11 sequences: more rows than one pass of the bandwidth-bound kernel takes (8 dense,
# 5 GGUF), so the rows run in groups.
LENGTHS = [0, 1, 3, TINY_WINDOW - 1, TINY_WINDOW, TINY_WINDOW + 1, 2 * TINY_WINDOW - 1, 20, 2, 5, 3 * TINY_WINDOW + 2]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def run_batched_against_single(model, lengths=LENGTHS, steps=2 * TINY_WINDOW + 3, seed=0):
    """Prefill each sequence into two caches; step one set together (a changing subset each step, so rows move
    between batch positions and batch sizes) and the other one sequence at a time. Every row must equal."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(6, vocab, (n,), generator=g) for n in lengths]
    size = max(lengths) + steps + 1
    together = [model.new_cache(size) for _ in lengths]
    alone = [model.new_cache(size) for _ in lengths]
    for p, a, b in zip(prompts, together, alone):
        if len(p):
            model.prefill(p, a)
            model.prefill(p, b)
    batched = model.batched_session(together)
    singles = [model.decode_session(c) for c in alone]
    tokens = torch.randint(6, vocab, (len(lengths),), generator=g).tolist()
    for step in range(steps):
        slots = [s for s in range(len(lengths)) if (s + step) % 4 != 0][::1 if step % 2 else -1]
        out = batched.logits([tokens[s] for s in slots], slots)
        assert out.shape == (len(slots), vocab)
        for row, s in enumerate(slots):
            want = singles[s].logits(tokens[s])
            assert torch.equal(out[row:row + 1], want), f"step {step}, slot {s} (row {row} of {len(slots)})"
            tokens[s] = int(torch.argmax(want))
    for a, b in zip(together, alone):
        assert a.seq_len == b.seq_len
        for x, y in zip(a.k + a.v, b.k + b.v):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,quantize", [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")])
def test_batched_steps_equal_single_steps(tiny_folder, backend, dtype, quantize):
    model = load_model_and_tokenizer(tiny_folder, dtype, "cpu", backend, quantize=quantize)[0]
    run_batched_against_single(model)


@needs_ext
def test_batched_steps_equal_single_steps_on_gguf_blocks(tiny_gguf):
    model = load_model_and_tokenizer(tiny_gguf, "auto", "cpu", "extension")[0]
    assert model.gguf_blocks
    run_batched_against_single(model, LENGTHS[:8])


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_op_matches_reference(tiny_folder, dtype):
    """The extension's decoder_forward_batched against reference_ops' (decoder_forward per sequence), with the
    caches written alike; and opcheck (schema, fake kernel, mutated caches declared)."""
    model = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "extension")[0]
    c, plan = model.config, model._block_plan()
    lengths = [0, 5, TINY_WINDOW + 3]
    caches = {}
    for name in ("ext", "ref"):
        caches[name] = [model.new_cache(32) for _ in lengths]
        for n, cache in zip(lengths, caches[name]):
            if n:
                model.prefill(torch.arange(6, 6 + n), cache)

    def args(cs):
        return (torch.tensor([7, 8, 9]), torch.tensor(lengths), model.embed_tokens.weight, model.embed_scale(),
                plan.first_norm, model.inv_freq_local, model.inv_freq_global, [t for x in cs for t in x.k],
                [t for x in cs for t in x.v], plan.weights, plan.scales, plan.norms, plan.windows, cs[0].ring,
                model.lm_head.weight, model.lm_head.scales, c.num_attention_heads, c.attn_scale, c.rms_norm_eps)

    got = torch.ops.gemma3_fast.decoder_forward_batched(*args(caches["ext"]))
    want = reference_ops.decoder_forward_batched(*args(caches["ref"]))
    tol = 5e-2 if dtype == "bfloat16" else 1e-4  # as test_kernels holds decoder_forward to its composition
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(1, want.abs().max().item()))
    for a, b in zip(caches["ext"], caches["ref"]):
        for x, y in zip(a.k + a.v, b.k + b.v):
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol * max(1, y.abs().max().item()))
    torch.library.opcheck(torch.ops.gemma3_fast.decoder_forward_batched.default, args(caches["ext"]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_session_bad_input_is_a_clear_error(tiny_folder, backend):
    model = load_model_and_tokenizer(tiny_folder, "float32", "cpu", backend)[0]
    caches = [model.new_cache(4) for _ in range(3)]
    session = model.batched_session(caches)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=r"slots \[1, 1\] repeat a slot"):
        session.logits([5, 6], [1, 1])
    with pytest.raises(ValueError, match="slot 3 does not exist: the session has 3 slots"):
        session.logits([5], [3])
    with pytest.raises(ValueError, match=f"token {vocab} is not a token id"):
        session.logits([5, vocab], [0, 1])
    with pytest.raises(ValueError, match="one slot per token"):
        session.logits([5, 6], [0])
    assert [c.seq_len for c in caches] == [0, 0, 0]  # a refused step does not advance
    caches[2].seq_len = 4
    with pytest.raises(ValueError, match="4 cached \\+ 1 new tokens exceed the KV cache of 4"):
        session.logits([5, 6], [0, 2])
    with pytest.raises(ValueError, match="at least one KV cache"):
        model.batched_session([])
    if backend == "extension":  # the C++ session's own checks, without a C++ backtrace
        with pytest.raises(RuntimeError) as err:
            session._native.logits_batch([5, 6], [0, 0], [1, 1])
        assert "slot 1 appears twice" in str(err.value) and "Exception raised from" not in str(err.value)
        with pytest.raises(RuntimeError, match="slots\\[i\\] 7 is not a slot: the session holds 3"):
            session._native.logits_batch([5], [0], [7])
        with pytest.raises(RuntimeError, match="as many positions and slots as tokens"):
            session._native.logits_batch([5, 6], [0], [0, 1])


@pytest.mark.slow
@needs_ext
@pytest.mark.parametrize("kind", ["native", "bfloat16", "int8"])
def test_batched_steps_equal_single_steps_on_the_real_model(kind, default_folder, default_gguf):
    """The real 270M (the GGUF on its blocks; the bf16 folder, and it quantized to int8): 6 sequences at
    different positions, including one past the 512-token window, stepped together and alone."""
    if kind == "native":
        model = load_model_and_tokenizer(default_gguf, "auto", "cpu", "extension")[0]
    else:
        model = load_model_and_tokenizer(default_folder, "bfloat16", "cpu", "extension",
                                         quantize="int8" if kind == "int8" else "none")[0]
    run_batched_against_single(model, lengths=[0, 3, 40, 511, 515, 9], steps=4)
