"""GGUF block weights run natively: the C++ decoding against gguf.quants.dequantize, the block linear against the
reference linear on dequantized weights, and a tiny GGUF file loaded natively against the same file dequantized."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gemma3_fast import gguf_blocks, ops, reference_ops
from gemma3_fast.loading import load_model_and_tokenizer
from gemma3_fast.weights import WeightsError, expected_hf_shapes

from tests.conftest import tiny_config, tiny_hf_tensors

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
needs_ext = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
ns = torch.ops.gemma3_fast
FORMATS = {Q.Q4_0: (32, 18), Q.Q5_0: (32, 22), Q.Q8_0: (32, 34), Q.Q4_K: (256, 144), Q.Q5_K: (256, 176),
           Q.Q6_K: (256, 210)}


def _f16(v: float) -> np.ndarray:
    return np.frombuffer(np.float16(v).tobytes(), np.uint8)


def random_blocks(kind, rows: int, in_features: int, seed: int = 0, scale: float = 0.01,
                  dmin: float = 0.02) -> torch.Tensor:
    """Random bytes for every quant, with the fp16 scale(s) set to `scale` (and Q4_K/Q5_K mins to `dmin`)."""
    elems, nbytes = FORMATS[kind]
    b = np.random.default_rng(seed).integers(0, 256, (rows, in_features // elems, nbytes), dtype=np.uint8)
    at = 208 if kind == Q.Q6_K else 0
    b[..., at:at + 2] = _f16(scale)
    if kind in (Q.Q4_K, Q.Q5_K):
        b[..., 2:4] = _f16(dmin)
    return torch.from_numpy(b)


def gguf_reference(blocks: torch.Tensor, kind) -> np.ndarray:
    return gguf.quants.dequantize(blocks.numpy().reshape(blocks.shape[0], -1), kind).reshape(blocks.shape[0], -1)


def test_python_side_reads_the_formats():
    for kind, (elems, nbytes) in FORMATS.items():
        blocks = random_blocks(kind, 3, elems * 2)
        assert gguf_blocks.block_type(blocks) == kind
        assert gguf_blocks.in_features(blocks) == elems * 2
        np.testing.assert_array_equal(reference_ops.dequantize(blocks).numpy(), gguf_reference(blocks, kind))
    with pytest.raises(ValueError, match="not a GGUF block weight"):
        gguf_blocks.block_type(torch.zeros(2, 3, 19, dtype=torch.uint8))


@needs_ext
@pytest.mark.parametrize("kind", list(FORMATS), ids=lambda k: k.name)
@pytest.mark.parametrize("case", ["random", "huge_scale", "tiny_scale", "negative_scale", "zero_blocks"])
def test_dequantize_is_bit_exact_with_gguf(kind, case):
    elems, _ = FORMATS[kind]
    scale = {"random": 0.01, "huge_scale": 60000.0, "tiny_scale": 6e-8, "negative_scale": -0.37,
             "zero_blocks": 0.01}[case]
    blocks = random_blocks(kind, 67, elems * 3, seed=len(case), scale=scale, dmin=scale / 2)
    if case == "zero_blocks":
        blocks[::2] = 0  # all-zero blocks: scale 0, every weight 0
    got = ns.dequantize(blocks).numpy()
    ref = gguf_reference(blocks, kind)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def assert_linear_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """y against x @ w^T in fp64, within fp32 rounding of the sum's terms: |dy| <= 1e-5 * sum |x_i w_i|."""
    exact = x.double() @ w.double().T
    bound = 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-30
    err = (y.double() - exact).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item()}, over bound by {(err / bound).max().item()}x"


@needs_ext
@pytest.mark.parametrize("kind", list(FORMATS), ids=lambda k: k.name)
@pytest.mark.parametrize("tokens", [1, 3, 5, 9, 16, 17, 40])  # 1..16: the streaming kernel; more: tiles + GEMM
def test_block_linear_matches_linear_on_dequantized(kind, tokens):
    elems, _ = FORMATS[kind]
    blocks = random_blocks(kind, 131, elems * 4, seed=tokens)  # odd row count
    w = torch.from_numpy(gguf_reference(blocks, kind))
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(tokens))
    y = ns.linear(x, blocks)
    assert y.shape == (tokens, 131) and y.dtype == torch.float32
    assert_linear_close(y, x, w)
    assert_linear_close(reference_ops.linear(x, blocks), x, w)


@needs_ext
@pytest.mark.parametrize("kind", list(FORMATS), ids=lambda k: k.name)
@pytest.mark.parametrize("mode", ["fp32", "int16"])
def test_block_linear_rows_are_batch_invariant(kind, mode):
    """Up to the streaming kernel's limit, each token's output is bit for bit the one it gets alone (the batched
    decode's contract): the tokens share each block's unpacking, not their sums."""
    if mode == "int16" and not ops.native_module().GGUF_INT16_ACTIVATIONS:
        pytest.skip("this build has no int16 kernels (no AVX2)")
    elems, _ = FORMATS[kind]
    blocks = random_blocks(kind, 67, elems * 3)
    limit = ops.native_module().gemv_token_limit(blocks)
    assert limit >= 8
    x = torch.randn(limit, blocks.shape[1] * elems, generator=torch.Generator().manual_seed(1))
    try:
        ops.set_gguf_activations(mode)
        alone = torch.cat([ns.linear(x[i:i + 1], blocks) for i in range(limit)])
        for tokens in (2, 3, 4, 5, 7, 8, 13, limit):
            assert torch.equal(ns.linear(x[:tokens], blocks), alone[:tokens]), tokens
    finally:
        ops.set_gguf_activations("fp32")


@needs_ext
@pytest.mark.parametrize("kind", list(FORMATS), ids=lambda k: k.name)
def test_int16_activations_mode_is_close_and_off_by_default(kind):
    elems, _ = FORMATS[kind]
    blocks = random_blocks(kind, 67, elems * 4)
    w = reference_ops.dequantize(blocks)
    x = torch.randn(3, w.shape[1])
    assert not ops.native_module().gguf_int16_activations()
    exact = ns.linear(x, blocks)
    prefill_x = torch.randn(40, w.shape[1])
    if not ops.native_module().GGUF_INT16_ACTIVATIONS:  # builds without AVX2: a clear refusal
        with pytest.raises(RuntimeError, match="only in AVX2 builds"):
            ops.set_gguf_activations("int16")
        return
    try:
        ops.set_gguf_activations("int16")
        fast = ns.linear(x, blocks)
        prefill = ns.linear(prefill_x, blocks)  # past the streaming kernel: the fp32 tiles, whatever the mode
    finally:
        ops.set_gguf_activations("fp32")
    assert not torch.equal(fast, exact)  # the mode is really on
    bound = 1e-4 * (x.abs() @ w.abs().T)  # int16 x: |error| <= k * max|x| / 65534 * max|w| per row
    assert bool(((fast - exact).abs() <= bound).all())
    assert torch.equal(prefill, ns.linear(prefill_x, blocks))
    with pytest.raises(ValueError, match="must be one of"):
        ops.set_gguf_activations("int8")


@needs_ext
def test_block_linear_shapes_bf16_and_argmax():
    blocks = random_blocks(Q.Q8_0, 300, 64)
    w = reference_ops.dequantize(blocks)
    x = torch.randn(2, 5, 64)  # leading batch dims
    torch.testing.assert_close(ns.linear(x, blocks), F.linear(x, w), rtol=1e-5, atol=1e-5)
    xb = x[0, :1].bfloat16()
    got = ns.linear(xb, blocks)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.linear(xb.float(), w).bfloat16())
    one = torch.randn(1, 64)
    assert ops.native_module().linear_argmax(one, blocks, None) == int(F.linear(one, w).argmax())


@needs_ext
def test_block_linear_bad_input_is_a_clear_error():
    blocks = random_blocks(Q.Q4_K, 4, 512)
    with pytest.raises(RuntimeError, match=r"Q4_K blocks\) has in_features 512 .* but x has 500 features"):
        ns.linear(torch.randn(1, 500), blocks)
    with pytest.raises(RuntimeError, match="blocks of 19 bytes, which is no supported GGUF format"):
        ns.linear(torch.randn(1, 64), torch.zeros(4, 2, 19, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="scales are only for int8 weights, but weight holds GGUF blocks"):
        ns.linear(torch.randn(1, 512), blocks, torch.ones(4))


# -- a tiny GGUF file ---------------------------------------------------------------------------------------
# hidden 256 and head_dim 64 so that every format's block (up to 256 weights) divides the rows.
GGUF_CONFIG = dict(hidden_size=256, intermediate_size=512, head_dim=64, vocab_size=300)
# Per GGUF tensor: the format it is written in. q/k Q5_0 beside a Q8_0 v is the default file's mix.
TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_K,
         "ffn_gate": Q.Q5_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K}
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
               "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm"}


def write_tiny_gguf(path, types=TYPES, truncate: int = 0):
    """A Gemma 3 GGUF of the tiny config: quantizable tensors quantized by gguf (Q4_0/Q5_0/Q8_0) or random
    blocks of the right magnitude (K formats), norms stored as llama.cpp stores them (1 + w)."""
    config = tiny_config(**GGUF_CONFIG)
    tensors = tiny_hf_tensors(config)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_uint32("gemma3.embedding_length", config.hidden_size)
    w.add_uint32("gemma3.block_count", config.num_hidden_layers)
    w.add_uint32("gemma3.feed_forward_length", config.intermediate_size)
    w.add_uint32("gemma3.attention.head_count", config.num_attention_heads)
    w.add_uint32("gemma3.attention.head_count_kv", config.num_key_value_heads)
    w.add_uint32("gemma3.attention.key_length", config.head_dim)
    w.add_uint32("gemma3.attention.sliding_window", config.sliding_window)
    w.add_uint32("gemma3.context_length", config.max_position_embeddings)
    w.add_float32("gemma3.rope.freq_base", config.rope_theta_global)
    w.add_string("tokenizer.ggml.model", "llama")
    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokens = special + [f"t{i}" for i in range(config.vocab_size - len(special))]
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", [0.0] * len(tokens))
    w.add_array("tokenizer.ggml.token_type", [3] * 4 + [1] * (len(tokens) - 4))
    for name, t in tensors.items():
        short = name[len("model."):]
        if short == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif short == "norm.weight":
            gname = "output_norm.weight"
        else:
            _, layer, rest = short.split(".", 2)
            gname = f"blk.{layer}.{_HF_TO_GGUF[rest.rsplit('.', 1)[0]]}.weight"
        kind = types.get(gname.split(".")[-2] if gname.startswith("blk.") else gname.split(".")[0])
        data = t.numpy().astype(np.float32)
        if "norm" in gname:
            w.add_tensor(gname, data + 1.0)
        elif kind == Q.F16:
            w.add_tensor(gname, data.astype(np.float16))
        elif kind == Q.BF16:
            w.add_tensor(gname, t.bfloat16().view(torch.int16).numpy(), raw_dtype=kind)
        elif kind in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0):
            w.add_tensor(gname, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            elems, _ = FORMATS[kind]
            std = float(data.std())
            blocks = random_blocks(kind, data.shape[0], data.shape[1], seed=len(gname), scale=std / 40,
                                   dmin=std / 20).numpy().reshape(data.shape[0], -1)
            w.add_tensor(gname, blocks, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate:
        data = path.read_bytes()
        path.write_bytes(data[:-truncate])
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@needs_ext
def test_tiny_gguf_quantized_to_int8_reads_its_head_for_lookups(tiny_gguf):
    """A GGUF with --quantize int8 (dequantized, then quantized; no reading by rows there): the int8 head is the
    lookups' table, and the model runs close to the dequantized one."""
    dense = load_model_and_tokenizer(tiny_gguf, "float32", "cpu", "extension")[0]
    q = load_model_and_tokenizer(tiny_gguf, "float32", "cpu", "extension", quantize="int8")[0]
    assert q.embed_tokens.weight is q.lm_head.weight and q.embed_tokens.weight.dtype == torch.int8
    ids = torch.tensor([2, 17, 45, 99, 3, 250, 7, 7, 120, 64, 11, 5])
    with torch.inference_mode():
        want = dense(ids, torch.arange(len(ids)), None, all_logits=True)
        got = q(ids, torch.arange(len(ids)), None, all_logits=True)
    assert (got - want).abs().max().item() <= 0.1 * want.abs().max().item()


@needs_ext
def test_tiny_gguf_runs_natively_and_matches_dequantized(tiny_gguf):
    native, tok = load_model_and_tokenizer(tiny_gguf, "auto", "cpu", "extension")
    assert native.gguf_blocks and native.dtype == torch.float32
    kinds = {name: gguf_blocks.NATIVE[gguf_blocks.block_type(p)][0] for name, p in native.named_parameters()
             if gguf_blocks.is_blocks(p)}
    assert kinds["layers.0.qkv_proj.weight"] == "Q8_0"  # Q5_0 q/k and Q8_0 v, brought to Q8_0 exactly
    assert kinds["layers.0.o_proj.weight"] == "Q4_K" and kinds["layers.0.down_proj.weight"] == "Q6_K"
    assert kinds["embed_tokens.weight"] == "Q8_0" and native.lm_head.weight is native.embed_tokens.weight
    dense = load_model_and_tokenizer(tiny_gguf, "float32", "cpu", "extension")[0]
    reference = load_model_and_tokenizer(tiny_gguf, "auto", "cpu", "reference")[0]
    # the native qkv, dequantized, is the dequantized file's q|k|v exactly
    torch.testing.assert_close(ns.dequantize(native.layers[1].qkv_proj.weight), dense.layers[1].qkv_proj.weight,
                               rtol=0, atol=0)
    ids = torch.tensor([2, 17, 45, 99, 3, 250, 7, 7, 120, 64, 11, 5])  # 12 tokens > the window of 8
    with torch.inference_mode():
        want = dense(ids, torch.arange(len(ids)), None, all_logits=True)
        for model in (native, reference):
            got = model(ids, torch.arange(len(ids)), None, all_logits=True)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # decode steps (the streaming kernels) through the cache, against the one-shot forward
        cache = native.new_cache(len(ids))
        native.prefill(ids[:5], cache)
        steps = [native.decode(ids[i:i + 1], cache)[0] for i in range(5, len(ids))]
        torch.testing.assert_close(torch.stack(steps), want[5:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be trained"):
        native.loss(ids[None], ids[None])
    from gemma3_fast.weights import hf_state_dict

    with pytest.raises(ValueError, match="GGUF block weights has no Hugging Face form"):
        hf_state_dict(native)


@needs_ext
def test_bf16_and_f16_tensors_beside_blocks(tmp_path):
    """BF16 projections stay bf16 (the bf16 kernels, fp32 activations), F16 ones become fp32; both exact."""
    path = write_tiny_gguf(tmp_path / "mixed.gguf", {**TYPES, "ffn_down": Q.BF16, "attn_output": Q.F16})
    native = load_model_and_tokenizer(path, "auto", "cpu", "extension")[0]
    dense = load_model_and_tokenizer(path, "float32", "cpu", "extension")[0]
    block = native.layers[0]
    assert block.down_proj.weight.dtype == torch.bfloat16 and block.o_proj.weight.dtype == torch.float32
    assert native.dtype == torch.float32
    torch.testing.assert_close(block.down_proj.weight.float(), dense.layers[0].down_proj.weight, rtol=0, atol=0)
    ids = torch.tensor([2, 17, 45, 99, 3, 250, 7, 7, 120, 64])
    with torch.inference_mode():
        torch.testing.assert_close(native(ids, torch.arange(len(ids)), None, all_logits=True),
                                   dense(ids, torch.arange(len(ids)), None, all_logits=True), rtol=1e-4, atol=1e-4)


def test_rows_not_a_multiple_of_the_block_are_refused():
    from gemma3_fast.gguf_blocks import tensor_nbytes

    with pytest.raises(WeightsError, match=r"tensor 'x' \(Q4_K\) has rows of 640 values, not a multiple of its "
                                           r"block of 256"):
        tensor_nbytes(int(Q.Q4_K), (4, 640), "tensor 'x'")


def test_dequantized_loads_read_the_embedding_in_chunks_into_their_dtype(tiny_gguf):
    """--dtype loads: the embedding dequantized chunk by chunk straight into its bf16 (or fp32) home."""
    dense = load_model_and_tokenizer(tiny_gguf, "float32", "cpu")[0]
    half = load_model_and_tokenizer(tiny_gguf, "bfloat16", "cpu")[0]
    assert half.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(half.embed_tokens.weight, dense.embed_tokens.weight.bfloat16())
    assert torch.equal(dense.embed_tokens.weight, reference_ops.dequantize(
        load_model_and_tokenizer(tiny_gguf, "auto", "cpu")[0].embed_tokens.weight))


def test_unsupported_type_names_the_tensor_and_the_option(tmp_path):
    path = write_tiny_gguf(tmp_path / "q4_1.gguf", {**TYPES, "ffn_up": Q.Q4_1})
    with pytest.raises(WeightsError, match=r"tensor 'blk.0.ffn_up.weight' has type Q4_1, which has no native "
                                           r"kernel .* --dtype float32"):
        load_model_and_tokenizer(path, "auto", "cpu")
    model = load_model_and_tokenizer(path, "float32", "cpu")[0]  # the option it names works
    assert model.dtype == torch.float32 and not model.gguf_blocks


def test_truncated_gguf_is_refused_before_any_computation(tmp_path):
    path = write_tiny_gguf(tmp_path / "cut.gguf", truncate=1000)
    with pytest.raises(WeightsError, match=r"tensor '.*' ends at byte \d+, past the end of the file .* truncated"):
        load_model_and_tokenizer(path, "auto", "cpu")


def test_shapes_of_the_tiny_config_fit_every_format():
    shapes = expected_hf_shapes(tiny_config(**GGUF_CONFIG))
    for shape in shapes.values():
        assert len(shape) == 1 or shape[1] % 256 == 0
