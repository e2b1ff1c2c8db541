"""Each compiled op against its PyTorch reference: shapes, dtypes, window edges, ring wrap, bad inputs."""

from __future__ import annotations

import platform

import pytest
import torch

from gemma3_fast import ops, reference_ops as ref

pytestmark = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
ext = torch.ops.gemma3_fast if ops.EXTENSION_AVAILABLE else None

DTYPES = [torch.float32, torch.bfloat16]


def assert_close_to_fp32_reference(out, ref_out_lowp, ref_fp32, dtype):
    """fp32: tight. bf16: the kernel's error vs the fp32 reference is at most ~2x the reference's own bf16 error."""
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_out_lowp, atol=2e-5, rtol=1e-5)
        return
    kernel_err = (out.float() - ref_fp32).abs().max().item()
    ref_err = (ref_out_lowp.float() - ref_fp32).abs().max().item()
    assert kernel_err <= 2 * ref_err + 1e-6, (kernel_err, ref_err)


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# -- RMSNorm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (7, 640), (3, 5, 256), (4, 13), (2, 1000)])
def test_rms_norm(shape, dtype):
    x, w = randn(*shape, dtype=dtype, scale=3), randn(shape[-1], dtype=dtype, scale=0.5)
    out = ext.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_to_fp32_reference(out, ref.rms_norm(x, w, 1e-6), ref.rms_norm(x.float(), w.float(), 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (9, 640), (4, 13)])
def test_add_rms_norm(shape, dtype):
    x, res = randn(*shape, dtype=dtype, scale=20), randn(*shape, dtype=dtype, scale=5, seed=1)
    wpost, wpre = randn(shape[-1], dtype=dtype, seed=2), randn(shape[-1], dtype=dtype, seed=3)
    h, y = ext.add_rms_norm(x, res, wpost, wpre, 1e-6)
    h_ref, y_ref = ref.add_rms_norm(x, res, wpost, wpre, 1e-6)
    h32, y32 = ref.add_rms_norm(x.float(), res.float(), wpost.float(), wpre.float(), 1e-6)
    assert_close_to_fp32_reference(h, h_ref, h32, dtype)
    assert_close_to_fp32_reference(y, y_ref, y32, dtype)
    if dtype == torch.bfloat16:  # same rounding points as the reference: bit-identical residual stream
        torch.testing.assert_close(h, h_ref, atol=0, rtol=0)


# -- QK-norm + RoPE --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hq,hk,d", [(1, 4, 1, 256), (7, 4, 1, 256), (33, 8, 2, 64), (3, 2, 2, 18)])
@pytest.mark.parametrize("start", [0, 511, 512, 30000])
def test_qk_norm_rope(t, hq, hk, d, start, dtype):
    q, k = randn(t, hq, d, dtype=dtype, scale=4), randn(t, hk, d, dtype=dtype, scale=4, seed=5)
    qw, kw = randn(d, dtype=dtype, scale=0.5, seed=6), randn(d, dtype=dtype, scale=0.5, seed=7)
    positions = torch.arange(start, start + t)
    cos, sin = ref.rope_cos_sin(positions, ref.rope_inv_freq(d, 1e6 if start > 1000 else 1e4))
    qo, ko = ext.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    for out, r, r32 in zip((qo, ko), ref.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6),
                           ref.qk_norm_rope(q.float(), k.float(), qw.float(), kw.float(), cos, sin, 1e-6)):
        assert out.is_contiguous()
        assert_close_to_fp32_reference(out, r, r32, dtype)


def test_qk_norm_rope_strided_views_of_fused_qkv():
    qkv = randn(5, 6 * 32)  # q: 4 heads, k: 1, v: 1, as the model's fused projection produces them
    q, k, _ = qkv.split((128, 32, 32), dim=-1)
    q, k = q.view(5, 4, 32), k.view(5, 1, 32)
    assert not q.is_contiguous()
    w = randn(32, scale=0.1)
    cos, sin = ref.rope_cos_sin(torch.arange(5), ref.rope_inv_freq(32, 1e4))
    for out, r in zip(ext.qk_norm_rope(q, k, w, w, cos, sin, 1e-6), ref.qk_norm_rope(q, k, w, w, cos, sin, 1e-6)):
        torch.testing.assert_close(out, r, atol=2e-5, rtol=1e-5)


# -- KV-cache write --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ring,slots,start,t", [
    (True, 8, 0, 1), (True, 8, 7, 1), (True, 8, 8, 1), (True, 8, 9, 1),  # window edges
    (True, 8, 37, 1),  # wrap after several windows
    (True, 8, 3, 20),  # a chunk longer than the ring: only the last 8 survive
    (False, 64, 0, 30), (False, 64, 63, 1),
])
def test_kv_cache_write(ring, slots, start, t, dtype):
    k, v = randn(t, 1, 32, dtype=dtype), randn(t, 1, 32, dtype=dtype, seed=9)
    kc, vc = randn(slots, 1, 32, dtype=dtype, seed=10), randn(slots, 1, 32, dtype=dtype, seed=11)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    positions = torch.arange(start, start + t)
    assert ext.kv_cache_write(kc, vc, k, v, positions, ring) is None
    ref.kv_cache_write(kc_ref, vc_ref, k, v, positions, ring)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.equal(kc[(start + t - 1) % slots], k[-1])


# -- attention -------------------------------------------------------------------------------------
W = 8  # small window: every edge case is a few tokens away
ATTENTION_CASES = [
    # (start, tokens, window, cache slots)
    (0, 1, W, W),  # position 0
    (6, 1, W, W), (7, 1, W, W), (8, 1, W, W), (9, 1, W, W),  # window - 1, window, window + 1
    (45, 1, W, W),  # ring wrapped several times
    (0, 20, W, 0),  # prompt longer than the window, one shot, no cache
    (5, 20, W, W),  # chunk longer than the window after cached tokens
    (16, 3, W, W),  # chunk across a wrap
    (0, 1, 0, 64), (40, 1, 0, 64), (30, 17, 0, 64),  # global layer
    (600, 1, 512, 512), (100, 128, 512, 512), (1000, 64, 0, 1100),  # real-model shapes
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,t,window,slots", ATTENTION_CASES)
# group sizes 4, 2 and 8 have unrolled decode kernels; 3 (and head_dim 20, not a multiple of 8) take the generic one.
# head_dim a multiple of 32 takes the AVX-512 decode path where the CPU has it (bf16 q.k on vdpbf16ps), 16 and 24
# the AVX2 one.
@pytest.mark.parametrize("hq,hk,d", [(4, 1, 32), (4, 2, 24), (4, 2, 64), (8, 1, 16), (3, 1, 20)])
def test_attention(start, t, window, slots, hq, hk, d, dtype):
    if start > 500 or t > 100:
        hq, hk, d = 4, 1, 256
    q = randn(t, hq, d, dtype=dtype, scale=2)
    k, v = randn(t, hk, d, dtype=dtype, seed=1), randn(t, hk, d, dtype=dtype, seed=2)
    kc, vc = randn(slots, hk, d, dtype=dtype, seed=3), randn(slots, hk, d, dtype=dtype, seed=4)
    positions = torch.arange(start, start + t)
    out = ext.attention(q, k, v, kc, vc, positions, window, d ** -0.5)
    r = ref.attention(q, k, v, kc, vc, positions, window, d ** -0.5)
    r32 = ref.attention(q.float(), k.float(), v.float(), kc.float(), vc.float(), positions, window, d ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_to_fp32_reference(out, r, r32, dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_attention_decode_split_matches_single_thread(threads):
    """Decode splits the key range across threads; the merged softmax must equal the unsplit one."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        q, k, v = randn(1, 4, 256, scale=2), randn(1, 1, 256, seed=1), randn(1, 1, 256, seed=2)
        kc, vc = randn(2000, 1, 256, seed=3), randn(2000, 1, 256, seed=4)
        pos = torch.tensor([1999])
        out = ext.attention(q, k, v, kc, vc, pos, 0, 1 / 16)
        torch.testing.assert_close(out, ref.attention(q, k, v, kc, vc, pos, 0, 1 / 16), atol=2e-6, rtol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_chunked_attention_with_cache_equals_one_shot():
    """Prefill in chunks (attend, then write the chunk into the ring) == one causal pass over all tokens."""
    n, d = 37, 32
    q, k, v = randn(n, 4, d), randn(n, 1, d, seed=1), randn(n, 1, d, seed=2)
    one_shot = ext.attention(q, k, v, k.new_zeros(0, 1, d), v.new_zeros(0, 1, d), torch.arange(n), W, 0.2)
    kc, vc = k.new_zeros(W, 1, d), v.new_zeros(W, 1, d)
    outs = []
    for s in range(0, n, 5):
        pos = torch.arange(s, min(n, s + 5))
        outs.append(ext.attention(q[pos], k[pos], v[pos], kc, vc, pos, W, 0.2))
        ext.kv_cache_write(kc, vc, k[pos], v[pos], pos, True)
    torch.testing.assert_close(torch.cat(outs), one_shot, atol=2e-6, rtol=1e-5)


# -- opcheck: schemas, fake kernels, autograd registration ------------------------------------------
def _op_samples():
    x, w = randn(3, 64), randn(64, seed=1)
    q, k, v = randn(4, 4, 32), randn(4, 1, 32, seed=2), randn(4, 1, 32, seed=3)
    cos, sin = ref.rope_cos_sin(torch.arange(10, 14), ref.rope_inv_freq(32, 1e4))
    kc, vc = randn(8, 1, 32, seed=4), randn(8, 1, 32, seed=5)
    pos = torch.arange(10, 14)
    return [
        (ext.rms_norm.default, (x, w, 1e-6)),
        (ext.add_rms_norm.default, (x, randn(3, 64, seed=6), w, w, 1e-6)),
        (ext.qk_norm_rope.default, (q, k, w[:32], w[:32], cos, sin, 1e-6)),
        (ext.kv_cache_write.default, (kc, vc, k, v, pos, True)),
        (ext.attention.default, (q, k, v, kc, vc, pos, 8, 0.25)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    op, args = _op_samples()[i]
    torch.library.opcheck(op, args)


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_inputs_raise_specific_errors():
    x, w = randn(3, 64), randn(64)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        ext.rms_norm(x.half(), w.half(), 1e-6)
    with pytest.raises(RuntimeError, match=r"weight has shape \[32\], expected \[64\]"):
        ext.rms_norm(x, w[:32], 1e-6)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.rms_norm(randn(64, 3).t(), w, 1e-6)
    with pytest.raises(RuntimeError, match="weight has dtype BFloat16 but x has Float"):
        ext.rms_norm(x, w.bfloat16(), 1e-6)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ext.add_rms_norm(x, randn(2, 64), w, w, 1e-6)

    q, k, v = randn(2, 4, 32), randn(2, 1, 32), randn(2, 1, 32)
    cos, sin = ref.rope_cos_sin(torch.arange(2), ref.rope_inv_freq(32, 1e4))
    with pytest.raises(RuntimeError, match=r"cos has shape \[3, 16\], expected \[2, 16\]"):
        ext.qk_norm_rope(q, k, w[:32], w[:32], torch.cat((cos, cos[:1])), sin, 1e-6)
    with pytest.raises(RuntimeError, match="cos must be float32"):
        ext.qk_norm_rope(q, k, w[:32], w[:32], cos.double(), sin, 1e-6)

    kc, vc = randn(8, 1, 32), randn(8, 1, 32)
    with pytest.raises(RuntimeError, match="positions must be consecutive"):
        ext.attention(q, k, v, kc, vc, torch.tensor([3, 5]), 8, 0.1)
    with pytest.raises(RuntimeError, match="positions must be int64"):
        ext.attention(q, k, v, kc, vc, torch.tensor([3, 4], dtype=torch.int32), 8, 0.1)
    with pytest.raises(RuntimeError, match="k_cache holds only 8 slots"):
        ext.attention(q, k, v, kc, vc, torch.tensor([20, 21]), 0, 0.1)  # global layer needs 20 cached keys
    with pytest.raises(RuntimeError, match="q_heads .3. must be a multiple of kv_heads .2."):
        ext.attention(randn(2, 3, 32), randn(2, 2, 32), randn(2, 2, 32), randn(8, 2, 32), randn(8, 2, 32),
                      torch.tensor([0, 1]), 8, 0.1)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        ext.attention(q, k, v, kc, vc, torch.tensor([0, 1]), -1, 0.1)
    with pytest.raises(RuntimeError, match=r"v_cache has shape \[8, 1, 16\], expected \[8, 1, 32\]"):
        ext.kv_cache_write(kc, randn(8, 1, 16), k, v, torch.tensor([0, 1]), True)
    with pytest.raises(RuntimeError, match="outside the linear cache of 8 slots"):
        ext.kv_cache_write(kc, vc, k, v, torch.tensor([7, 8]), False)
    with pytest.raises(RuntimeError, match="k_cache has dtype BFloat16 but k has Float"):
        ext.kv_cache_write(kc.bfloat16(), vc.bfloat16(), k, v, torch.tensor([0, 1]), True)



# -- linear (fp32 / bf16 / int8 weights) ------------------------------------------------------------
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("tokens,k,n", [(1, 640, 1536), (1, 2048, 640), (3, 640, 130), (1, 100, 7), (8, 37, 33),
                                        (9, 640, 256), (64, 2048, 640)])  # decode kernel to 8-32 tokens, then matmul
def test_linear(x_dtype, w_kind, tokens, k, n):
    from gemma3_fast.quantize import quantize_int8

    x = randn(tokens, k, dtype=x_dtype, scale=3)
    w32 = randn(n, k, seed=1) * k ** -0.5
    if w_kind == "int8":
        w, scales = quantize_int8(w32)
    else:
        w, scales = w32.to(getattr(torch, w_kind)), None
    if x_dtype == torch.bfloat16 and w_kind == "float32":
        w = w.to(torch.bfloat16)  # the model keeps weights in its own dtype
    out = ext.linear(x, w, scales)
    assert out.shape == (tokens, n) and out.dtype == x_dtype
    r = ref.linear(x, w, scales)
    r32 = ref.linear(x.float(), w.float() if scales is None else w, scales)
    if x_dtype == torch.float32:
        # int8 activations are quantized to int16 in the decode kernel: relative error ~1e-4 of max |x|
        tol = 5e-4 * r32.abs().max().item() if w_kind == "int8" else 1e-4
        torch.testing.assert_close(out, r32, atol=tol, rtol=1e-4)
    else:
        kernel_err = (out.float() - r32).abs().max().item()
        ref_err = (r.float() - r32).abs().max().item()
        assert kernel_err <= 2 * ref_err + 1e-3 * r32.abs().max().item(), (kernel_err, ref_err)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_kind", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("k", [640, 100, 37])
def test_linear_decode_rows_are_batch_invariant(x_dtype, w_kind, k):
    """Up to the decode kernel's limit (gemv_token_limit: by weight type and SIMD level, 8 to 32 tokens), each
    token's output is bit for bit the one it gets alone (the batched decode's contract): the tokens share each weight
    row's loads, not their sums. Odd k: the scalar tails too."""
    from gemma3_fast.quantize import quantize_int8

    w32 = randn(67, k, seed=1) * k ** -0.5
    w, scales = quantize_int8(w32) if w_kind == "int8" else (w32.to(getattr(torch, w_kind)), None)
    if x_dtype == torch.bfloat16 and w_kind == "float32":
        w = w.to(torch.bfloat16)
    limit = ops.native_module().gemv_token_limit(w)
    assert limit >= 8
    x = randn(limit, k, dtype=x_dtype, scale=3)
    alone = torch.cat([ext.linear(x[i:i + 1], w, scales) for i in range(limit)])
    for tokens in (2, 3, 4, 5, 7, 8, 13, limit):
        assert torch.equal(ext.linear(x[:tokens], w, scales), alone[:tokens]), tokens


def test_int8_activation_quantization_is_exact():
    """The int8 decode kernel quantizes x to int16 (vec::quantize_int16: vector loop, scalar tail). Through an
    identity weight each output is one product, q[j] * scale, exact: it must equal the specification,
    round-half-even(x / (max|x| / 32767)) * scale, for the rows the SIMD dot covers (the first 128 of 133).
    The last 5 go through the fp32 tail, x itself; a build without SIMD gives x for every row."""
    k = 133
    x = randn(1, k, scale=3)
    x[0, 5] = -x.abs().max() * 1.5  # the max |x| is negative: q = -32767 there
    w, scales = torch.eye(k, dtype=torch.int8), torch.ones(k)
    out = ext.linear(x, w, scales)
    scale = x.abs().max() / 32767
    spec = torch.round(x / scale) * scale
    assert torch.equal(out[:, 128:], x[:, 128:])
    assert torch.equal(out[:, :128], spec[:, :128]) or torch.equal(out, x)
    assert not torch.equal(spec[:, :128], x[:, :128])  # the two cases differ: the assertion above can fail


@pytest.mark.parametrize("onednn", [True, False])
def test_linear_prefill_fp32_backends(onednn):
    """fp32 prefill runs oneDNN's matmul (MKL's sgemm when oneDNN is off): same values, leading dims kept."""
    x, w = randn(2, 20, 96, scale=2), randn(48, 96, seed=1) * 96 ** -0.5
    with torch.backends.mkldnn.flags(enabled=onednn):
        out = ext.linear(x, w)
    assert out.shape == (2, 20, 48)
    torch.testing.assert_close(out, ref.linear(x, w), atol=1e-4, rtol=1e-4)


# torch's fp32 matmul on x86-64 (MKL, oneDNN) sums each output element the same way whatever the number of output
# columns, so a block that projects keys and values alone writes the bits of one that projects q, k and v
# together. On ARM (oneDNN with ACL) the sums are blocked by shape: there the two agree to rounding.
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def assert_same_projection(got: torch.Tensor, want: torch.Tensor) -> None:
    if IS_X86:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want)  # dtype's default tolerance: fp32 1.3e-6, bf16 1.6e-2 relative


def _cpu_has_avx512_bf16() -> bool:
    if not IS_X86:  # under emulation /proc/cpuinfo is the host's
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.parametrize("switch", ["matmul", "all", "float32_matmul_precision"])
def test_linear_prefill_fp32_in_bf16_only_when_allowed(switch):
    """torch's switches for bf16 math in oneDNN's fp32 matmuls (off by default) make fp32 prefill compute in bf16
    where the CPU has AVX512-BF16: x and W rounded to bf16, fp32 sums, the output rounded to bf16. Without a
    switch, or without AVX512-BF16, fp32 stays fp32. Decode (the gemv) is never affected."""
    x, w = randn(2, 20, 96, scale=2), randn(48, 96, seed=1) * 96 ** -0.5
    exact = ext.linear(x, w)
    bf16_spec = (x.bfloat16().float() @ w.bfloat16().float().t()).bfloat16().float()
    assert not torch.equal(exact, bf16_spec)  # the two outcomes differ: the assertions below can fail
    if switch != "float32_matmul_precision" and not hasattr(torch.backends.mkldnn, "fp32_precision"):
        pytest.skip("torch < 2.9 has no torch.backends.mkldnn fp32_precision switches")
    mkldnn_switches = hasattr(torch.backends.mkldnn, "fp32_precision")
    old = ((torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.fp32_precision)
           if mkldnn_switches else None, torch.get_float32_matmul_precision())
    try:
        if switch == "matmul":
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        elif switch == "all":
            torch.backends.mkldnn.fp32_precision = "bf16"
        else:
            torch.set_float32_matmul_precision("medium")
        out, decode = ext.linear(x, w), ext.linear(x[:, :1].contiguous(), w)
    finally:
        torch.set_float32_matmul_precision(old[1])
        if mkldnn_switches:
            torch.backends.mkldnn.fp32_precision = old[0][1]
            torch.backends.mkldnn.matmul.fp32_precision = old[0][0]
    assert out.dtype == torch.float32 and out.shape == (2, 20, 48)
    if _cpu_has_avx512_bf16():
        torch.testing.assert_close(out, bf16_spec, atol=1e-2, rtol=1e-2)
        assert (out - bf16_spec).abs().max() < (exact - bf16_spec).abs().max()
    elif IS_X86:
        assert torch.equal(out, exact)
    else:  # oneDNN decides on ARM: it may honor the switch where the CPU has BF16 instructions
        assert torch.equal(out, exact) or torch.allclose(out, bf16_spec, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(decode, ref.linear(x[:, :1], w), atol=1e-4, rtol=1e-4)
    assert torch.equal(ext.linear(x, w), exact)  # switched back: exact again


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1536, 262144 // 64 + 5])
def test_linear_decode_rows_all_written_once(threads, n):
    """The decode kernel hands rows out in shrinking chunks from a shared counter: every row, once, for any
    thread count and any row count (partial 64-row blocks included)."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        x, w = randn(1, 64, scale=2), randn(n, 64, seed=1)
        torch.testing.assert_close(ext.linear(x, w), ref.linear(x, w), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("k", [640, 37])
def test_linear_prefill_int8_dequantizes_exactly(x_dtype, k):
    """Above 32 tokens (the decode kernel's limit) an int8 weight is dequantized in one pass (dequantize_int8) for
    the matmul: the same values as the fp32 product w * scale (then bf16 where the matmul runs in bf16), so the
    output equals the matmul of that dequantized weight exactly. Odd k: the scalar tail of each row."""
    from gemma3_fast.quantize import quantize_int8

    w, scales = quantize_int8(randn(70, k, seed=1) * k ** -0.5)
    x = randn(40, k, dtype=x_dtype, scale=3)
    assert torch.equal(ext.linear(x, w, scales), ext.linear(x, w.float() * scales[:, None]))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("w_kind", ["bfloat16", "int8"])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 63, 65, 1000])
def test_linear_decode_16_row_blocks(threads, w_kind, n):
    """bf16 and int8 weights (k a multiple of 32) are reduced 16 rows at a time on AVX-512 builds, the last block
    of each thread's rows masked: every row is written, and no other (a stray lane would land in the next token's
    first rows), for 1-8 tokens and any thread count. int8 rows go in pairs against up to 4 tokens (an odd row
    count leaves one alone, 5 and 7 tokens leave a short group): each token's outputs are still exactly its
    batch-1 ones. k = 96 has a 32-weight step after the 64-weight ones."""
    from gemma3_fast.quantize import quantize_int8

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for k in (64, 96):
            w32 = randn(n, k, seed=1) * 0.125
            w, scales = quantize_int8(w32) if w_kind == "int8" else (w32.bfloat16(), None)
            for x_dtype in DTYPES:
                for tokens in (1, 3, 5, 7, 8):
                    x = randn(tokens, k, dtype=x_dtype, scale=2)
                    out = ext.linear(x, w, scales)
                    r32 = ref.linear(x.float(), w.float() if scales is None else w, scales)
                    torch.testing.assert_close(out.float(), r32, atol=2e-2, rtol=1e-2)
                    for t in range(tokens):
                        assert torch.equal(out[t:t + 1], ext.linear(x[t:t + 1], w, scales)), (k, tokens, t)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("w_kind", ["float32", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_linear_decode_propagates_nan(w_kind, tokens):
    """A NaN in x gives NaN outputs for its token, in fp32 and in bf16 (the vector bf16 rounding must not carry a
    NaN into the sign bit or to infinity), and leaves the other tokens alone."""
    x = randn(tokens, 640, dtype=torch.bfloat16)
    x[-1, 7] = float("nan")
    w = randn(40, 640, seed=1).to(getattr(torch, w_kind))
    if w_kind == "float32":
        w = w.bfloat16()
    for xd in (x, x.float()):
        out = ext.linear(xd, w if xd.dtype == torch.bfloat16 else w.float())
        assert torch.isnan(out[-1]).all() and not torch.isnan(out[:-1]).any()


def test_linear_opcheck_and_bad_inputs():
    from gemma3_fast.quantize import quantize_int8

    x, w = randn(2, 64), randn(32, 64, seed=1)
    q, s = quantize_int8(w)
    torch.library.opcheck(ext.linear.default, (x, w, None))
    torch.library.opcheck(ext.linear.default, (x, q, s))
    with pytest.raises(RuntimeError, match="weight has in_features 64 but x has 63 features"):
        ext.linear(randn(2, 63), w)
    with pytest.raises(RuntimeError, match="int8 weight needs scales"):
        ext.linear(x, q)
    with pytest.raises(RuntimeError, match="scales are only for int8 weights"):
        ext.linear(x, w, s)
    with pytest.raises(RuntimeError, match=r"scales has shape \[31\], expected \[32\]"):
        ext.linear(x, q, s[:31])
    with pytest.raises(RuntimeError, match="weight must be float32, bfloat16 or int8"):
        ext.linear(x, w.half())


# -- argmax: greedy decoding's pick -----------------------------------------------------------------
def _argmax_input(shape, dtype, case, seed):
    x = randn(*shape, seed=seed)
    g = torch.Generator().manual_seed(seed)
    if case == "ties":  # few distinct values: the first of several equal maxima must win
        x = x.round()
    elif case == "max_at_ends":  # the maximum on the first and on the last element: part boundaries and tails
        x[..., 0] = 100.0
        x[..., -1] = 100.0
    elif case == "nan":  # NaN counts as the largest value, and the first NaN wins
        x[..., torch.randint(0, shape[-1], (3,), generator=g)] = float("nan")
    elif case == "all_neg_inf":
        x.fill_(float("-inf"))
    elif case == "signed_zeros":  # -0.0 == +0.0: the first of either
        x = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0) - (torch.rand(shape, generator=g) < 0.3).float()
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(262144,), (1, 262144), (1, 40003), (3, 1000), (2, 5, 33), (7,), (1, 1)])
@pytest.mark.parametrize("case", ["random", "ties", "max_at_ends", "nan", "all_neg_inf", "signed_zeros"])
def test_argmax(shape, dtype, case):
    for seed in range(3):
        x = _argmax_input(shape, dtype, case, seed)
        out = ext.argmax(x)
        assert out.dtype == torch.long and out.shape == x.shape[:-1]
        assert torch.equal(out, ref.argmax(x)), (case, seed)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_argmax_row_split_matches_torch(threads):
    """One long row is split among the threads; the parts' answers combine to the first maximum of the row."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for seed in range(5):
            x = randn(1, 100_000, seed=seed).round()  # ties across the parts
            assert torch.equal(ext.argmax(x), ref.argmax(x))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype,int8", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_linear_argmax_is_argmax_of_linear(threads, dtype, int8):
    """DecodeSession.greedy's head: the argmax of a one-token linear, gathered chunk by chunk from the shared row
    counter while the output is written. The first maximum, as the argmax op finds it in the written output:
    with ties (equal rows, in different chunks), a NaN row, and every thread count."""
    from gemma3_fast.ops import native_module
    from gemma3_fast.quantize import quantize_int8

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for seed, n in ((0, 5000), (1, 262), (2, 64)):
            w = randn(n, 96, seed=seed)
            best = int((w @ randn(96, seed=9)).argmax())
            for dup in (n - 1, n // 2, best - 1, 0):  # copies of the best row, after and before it
                if 0 <= dup < n:
                    w[dup] = w[best]
            weight, scales = quantize_int8(w) if int8 else (w.to(dtype), None)
            x = randn(1, 96, seed=9).to(dtype)
            logits = ext.linear(x, weight, scales)
            assert native_module().linear_argmax(x, weight, scales) == int(ext.argmax(logits)[0])
            if n > 100 and not int8:  # a NaN row beats everything
                nan_w = weight.clone()
                nan_w[n - 7, 3] = float("nan")
                assert native_module().linear_argmax(x, nan_w, None) == n - 7
    finally:
        torch.set_num_threads(old)
    with pytest.raises(RuntimeError, match="linear_argmax takes one token, got x of shape \\[2, 96\\]"):
        native_module().linear_argmax(randn(2, 96), randn(10, 96))


def test_argmax_opcheck_and_bad_inputs():
    torch.library.opcheck(ext.argmax.default, (randn(3, 100),))
    with pytest.raises(RuntimeError, match="argmax needs a non-empty last dimension, got shape \\[3, 0\\]"):
        ext.argmax(torch.empty(3, 0))
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16, got Half"):
        ext.argmax(randn(3, 10).half())
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        ext.argmax(randn(10, 3).t())


# -- decoder_layer: a whole block in one op ---------------------------------------------------------
def _block_args(t, start, window, slots, dtype, int8=False, write_cache=True, hidden=64, hq=4, hk=1, d=32, inter=96):
    from gemma3_fast.quantize import quantize_int8

    shapes = [((hq + 2 * hk) * d, hidden), (hidden, hq * d), (2 * inter, hidden), (hidden, inter)]
    weights, scales = [], []
    for i, shape in enumerate(shapes):
        w = randn(*shape, seed=10 + i) * shape[1] ** -0.5
        if int8:
            w, s = quantize_int8(w)
            weights.append(w)
            scales.append(s)
        else:
            weights.append(w.to(dtype))
            scales.append(None)
    norms = [randn(n, dtype=dtype, seed=20 + i, scale=0.3) for i, n in enumerate((d, d, hidden, hidden, hidden,
                                                                                   hidden))]
    positions = torch.arange(start, start + t)
    cos, sin = ref.rope_cos_sin(positions, ref.rope_inv_freq(d, 1e4))
    h = randn(t, hidden, dtype=dtype, seed=1, scale=4)
    y = ref.rms_norm(h, norms[2], 1e-6)
    kc, vc = randn(slots, hk, d, dtype=dtype, seed=3), randn(slots, hk, d, dtype=dtype, seed=4)
    return [h, y, positions, cos, sin, kc, vc, weights, scales, norms, hq, window, d ** -0.5, 1e-6,
            window > 0, write_cache]


def _to_fp32(args):
    def conv(a):
        if isinstance(a, list):
            return [conv(x) for x in a]
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a
    return [conv(a) for a in args]


BLOCK_CASES = [  # (start, tokens, window, cache slots): decode across the window edges and a wrap, prefill
    (0, 1, W, W), (7, 1, W, W), (8, 1, W, W), (9, 1, W, W), (45, 1, W, W),
    (0, 20, W, W), (5, 20, W, W), (30, 1, 0, 64), (30, 17, 0, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("start,t,window,slots", BLOCK_CASES)
def test_decoder_layer(start, t, window, slots, int8, dtype):
    args = _block_args(t, start, window, slots, dtype, int8)
    ref_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    h, y = ext.decoder_layer(*args)
    rh, ry = ref.decoder_layer(*ref_args)
    f32_args = _to_fp32([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    h32, y32 = ref.decoder_layer(*f32_args)
    assert h.shape == args[0].shape and h.dtype == dtype and y.dtype == dtype
    if dtype == torch.float32:
        # int8 weights: the decode kernel quantizes activations to int16 (relative error ~1e-4)
        tol = 2e-3 if int8 else 1e-4
        torch.testing.assert_close(h, rh, atol=tol, rtol=tol)
        torch.testing.assert_close(y, ry, atol=tol, rtol=tol)
        torch.testing.assert_close(args[5], ref_args[5], atol=tol, rtol=tol)  # the keys written into the cache
        torch.testing.assert_close(args[6], ref_args[6], atol=tol, rtol=tol)
    else:
        for out, r, r32 in ((h, rh, h32), (y, ry, y32), (args[5], ref_args[5], f32_args[5])):
            kernel_err = (out.float() - r32).abs().max().item()
            ref_err = (r.float() - r32).abs().max().item()
            assert kernel_err <= 2 * ref_err + 1e-2 * r32.abs().max().item(), (kernel_err, ref_err)


def _stack_args(t, start, dtype, windows=(W, W, 0, W), int8=False, slots=64):
    """decoder_layers' arguments for len(windows) blocks, each with its own weights and cache (a ring of W slots
    for sliding blocks, `slots` for global ones), and the per-block decoder_layer argument lists."""
    blocks = []
    for i, window in enumerate(windows):
        args = _block_args(t, start, window, W if window else slots, dtype, int8)
        # _block_args is seeded: make the blocks differ (int8 weights through their scales)
        args[7] = [w if w.dtype == torch.int8 else w * (1 + 0.1 * i) for w in args[7]]
        args[8] = [s if s is None else s * (1 + 0.1 * i) for s in args[8]]
        args[9] = [n + 0.05 * i for n in args[9]]
        blocks.append(args)
    h, y, positions = blocks[0][0], blocks[0][1], blocks[0][2]
    stack = [h, y, positions, [x for b in blocks for x in (b[3], b[4])], [b[5] for b in blocks],
             [b[6] for b in blocks], [w for b in blocks for w in b[7]], [s for b in blocks for s in b[8]],
             [n for b in blocks for n in b[9]], list(windows), [bool(w) for w in windows], blocks[0][10],
             blocks[0][12], blocks[0][13], True]
    return stack, blocks


def _clone_args(args):
    return [[x.clone() if isinstance(x, torch.Tensor) else x for x in a] if isinstance(a, list)
            else a.clone() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("start,t", [(0, 1), (9, 1), (45, 1), (0, 20), (30, 17)])
def test_decoder_layers_equals_its_blocks_one_by_one(start, t, int8, dtype):
    """The stack op is decoder_layer applied block after block (same kernels: equal results, caches included),
    and matches the reference stack."""
    stack, blocks = _stack_args(t, start, dtype, int8=int8)
    ref_stack = _clone_args(stack)
    h, y = ext.decoder_layers(*stack)
    bh, by = blocks[0][0], blocks[0][1]
    _, fresh = _stack_args(t, start, dtype, int8=int8)  # `blocks` shares its caches with `stack`: new ones
    for b in fresh:
        b[0], b[1] = bh, by
        bh, by = ext.decoder_layer(*b)
    assert torch.equal(h, bh) and torch.equal(y, by)
    for i, b in enumerate(fresh):
        assert torch.equal(stack[4][i], b[5]) and torch.equal(stack[5][i], b[6])
    rh, ry = ref.decoder_layers(*ref_stack)
    tol = (2e-3 if int8 else 1e-4) if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(h.float(), rh.float(), atol=tol * max(1, rh.abs().max().item()), rtol=tol)
    torch.testing.assert_close(y.float(), ry.float(), atol=tol * max(1, ry.abs().max().item()), rtol=tol)


def test_decoder_layers_opcheck_and_bad_inputs():
    stack, _ = _stack_args(1, 9, torch.float32)
    torch.library.opcheck(ext.decoder_layers.default, tuple(stack))
    stack, _ = _stack_args(3, 4, torch.float32, windows=(0, W), int8=True)
    torch.library.opcheck(ext.decoder_layers.default, tuple(stack))
    stack, _ = _stack_args(1, 9, torch.float32)
    bad = list(stack)
    bad[6] = stack[6][:-1]
    with pytest.raises(RuntimeError, match=r"takes 4 weights per layer \(qkv, o, gate_up, down\): 4 layers "
                                           r"\(the length of windows\) need 16, got 15"):
        ext.decoder_layers(*bad)
    with pytest.raises(ValueError, match=r"takes 4 weights per layer: 4 layers \(the length of windows\) need 16"):
        ref.decoder_layers(*bad)
    bad = list(stack)
    bad[3] = stack[3][:-2]
    with pytest.raises(RuntimeError, match=r"takes 2 rope tensors per layer \(cos, sin\)"):
        ext.decoder_layers(*bad)
    bad = list(stack)
    bad[6] = list(stack[6])
    bad[6][4 * 2 + 2] = stack[6][4 * 2 + 2][:-2]  # layer 2's gate_up
    with pytest.raises(RuntimeError, match=r"decoder_layers, layer 2: gemma3_fast: weights\[2\] \(gate_up_proj\) "
                                           r"has 190 rows"):
        ext.decoder_layers(*bad)
    bad = list(stack)
    bad[9] = []
    with pytest.raises(RuntimeError, match="needs at least one layer"):
        ext.decoder_layers(*bad)


def _forward_args(t, start, dtype, int8=False, all_logits=False, vocab=50):
    """decoder_forward's arguments around a decoder_layers stack: token ids, an embedding (tied head, or an int8
    head with its own scales), the first norm and the RoPE frequencies of both bases."""
    from gemma3_fast.quantize import quantize_int8

    stack, _ = _stack_args(t, start, dtype, int8=int8)
    embed = randn(vocab, stack[0].shape[1], dtype=dtype, seed=30)
    head, head_scales = quantize_int8(embed.float()) if int8 else (embed, None)
    ids = torch.randint(0, vocab, (t,), generator=torch.Generator().manual_seed(start + t))
    first_norm = randn(stack[0].shape[1], dtype=dtype, seed=31, scale=0.3)
    d = stack[8][0].shape[0]
    return [ids, stack[2], embed, 8.0, first_norm, ref.rope_inv_freq(d, 1e4), ref.rope_inv_freq(d, 1e6), stack[4],
            stack[5], stack[6], stack[7], stack[8], stack[9], stack[10], head, head_scales, stack[11], stack[12],
            stack[13], True, all_logits]


def _composed_forward(args):
    """decoder_forward(*args) op by op: embedding * scale, rms_norm, the RoPE tables of both bases (sliding layers:
    local), decoder_layers, the head (all rows, or the last). Returns the logits and the (written) caches."""
    (ids, positions, embed, scale, first_norm, inv_local, inv_global, k_caches, v_caches, weights, scales, norms,
     windows, ring, head, head_scales, hq, attn_scale, eps, write, all_logits) = args
    h = torch.nn.functional.embedding(ids, embed) * scale
    local, global_ = ref.rope_cos_sin(positions, inv_local), ref.rope_cos_sin(positions, inv_global)
    rope = [x for w in windows for x in (local if w else global_)]
    _, y = ext.decoder_layers(h, ext.rms_norm(h, first_norm, eps), positions, rope, k_caches, v_caches, weights,
                              scales, norms, windows, ring, hq, attn_scale, eps, write)
    return ext.linear(y if all_logits else y[-1:], head, head_scales), (k_caches, v_caches)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("start,t,all_logits", [(0, 1, False), (45, 1, False), (0, 20, True), (30, 17, False)])
def test_decoder_forward_equals_its_composition(start, t, all_logits, int8, dtype):
    """The forward op is embedding * scale, rms_norm, the RoPE tables of both bases (sliding layers: local),
    decoder_layers and the head, run op by op: equal logits and caches; and it matches the reference."""
    args = _forward_args(t, start, dtype, int8, all_logits)
    composed, ref_args = _clone_args(args), _clone_args(args)
    logits = ext.decoder_forward(*args)
    expected, (k_caches, v_caches) = _composed_forward(composed)
    assert logits.shape == (t if all_logits else 1, args[2].shape[0]) and logits.dtype == dtype
    if all_logits or t == 1:
        assert torch.equal(logits, expected)
    else:  # the last block ran for the last token alone: other kernels (gemv, decode attention), other rounding
        tol = (1e-4 if int8 else 1e-5) if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(logits, expected, rtol=tol, atol=tol * expected.abs().max().item())
    for got, want in zip(args[7] + args[8], k_caches + v_caches):
        assert_same_projection(got, want)
    assert not torch.equal(args[7][0], _forward_args(t, start, dtype, int8, all_logits)[7][0])  # caches written
    ref_logits = ref.decoder_forward(*ref_args)
    tol = (2e-3 if int8 else 1e-4) if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=tol,
                               atol=tol * max(1, ref_logits.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("start,t", [(0, 2), (0, 40), (30, 17), (40, 9)])
def test_decoder_forward_last_token_only_equals_all_logits(start, t, int8, dtype):
    """Without all_logits the last block runs for the last token alone (its keys and values still cached for every
    token): the last row of all_logits' logits, and the same caches. Prompts at position 0, longer than the
    sliding ring (W slots), and after cached keys."""
    args = _forward_args(t, start, dtype, int8, all_logits=False)
    every = _clone_args(args)
    every[-1] = True
    last, all_rows = ext.decoder_forward(*args), ext.decoder_forward(*every)
    assert last.shape == (1, all_rows.shape[1])
    tol = (1e-4 if int8 else 1e-5) if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(last, all_rows[-1:], rtol=tol, atol=tol * all_rows.abs().max().item())
    for got, want in zip(args[7] + args[8], every[7] + every[8]):
        assert_same_projection(got, want)


def test_decoder_forward_last_token_only_needs_room_in_the_ring():
    """The last-token block writes the chunk's keys before attention. A ring of window - 1 slots (enough for the
    whole-chunk block, which attends first) would lose the oldest key the last token reads: there the full block
    runs, and the logits equal the op-by-op composition bit for bit."""
    start, t = 30, 17
    args = _forward_args(t, start, torch.float32)
    k_caches, v_caches = args[7], args[8]
    for caches in (k_caches, v_caches):  # the last block (sliding, window W): a ring of W - 1 slots
        caches[-1] = randn(W - 1, *caches[-1].shape[1:], dtype=caches[-1].dtype, seed=32)
    composed = _clone_args(args)
    logits = ext.decoder_forward(*args)
    assert args[12][-1] == W and args[13][-1]  # the last block: sliding, a ring
    assert torch.equal(logits, _composed_forward(composed)[0])


def test_decoder_forward_takes_strided_rope_frequencies():
    """inv_freq_local/global as strided views (every other element of a longer vector): the same logits and caches
    as with contiguous copies (the kernel reads them through contiguous tensors it keeps alive)."""
    args = _forward_args(1, 45, torch.float32)
    strided = _clone_args(args)
    for i in (5, 6):
        strided[i] = torch.stack([args[i], torch.full_like(args[i], 1e9)], 1)[:, 0]
        assert not strided[i].is_contiguous()
    assert torch.equal(ext.decoder_forward(*strided), ext.decoder_forward(*args))
    for got, want in zip(strided[7] + strided[8], args[7] + args[8]):
        assert torch.equal(got, want)


def test_decoder_forward_opcheck_and_bad_inputs():
    torch.library.opcheck(ext.decoder_forward.default, tuple(_forward_args(1, 9, torch.float32)))
    torch.library.opcheck(ext.decoder_forward.default, tuple(_forward_args(3, 4, torch.float32, int8=True,
                                                                          all_logits=True)))
    args = _forward_args(2, 9, torch.float32)
    for index, value, message in (
            (0, torch.tensor([3, 50]), r"ids\[1\] = 50 is not a token id: the embedding has 50 rows"),
            (0, args[0].float(), r"ids must be a non-empty int64 tensor \[tokens\], got Float"),
            (14, args[14][:, :-1].contiguous(), r"decoder_forward, the output head \(head_weight, head_scales\): "
                                                r"gemma3_fast: weight has in_features 63 but x has 64"),
            (9, args[9][:-1], r"takes 4 weights per layer"),
            (5, args[5].double(), r"inv_freq_local must be float32")):
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            ext.decoder_forward(*bad)


def test_decoder_layer_without_cache_write_leaves_cache_alone():
    args = _block_args(1, 9, W, W, torch.float32, write_cache=False)
    before = args[5].clone(), args[6].clone()
    ext.decoder_layer(*args)
    assert torch.equal(args[5], before[0]) and torch.equal(args[6], before[1])


def test_decoder_layer_opcheck_and_bad_inputs():
    torch.library.opcheck(ext.decoder_layer.default, tuple(_block_args(1, 9, W, W, torch.float32)))
    torch.library.opcheck(ext.decoder_layer.default, tuple(_block_args(3, 4, 0, 16, torch.float32, int8=True)))
    args = _block_args(1, 9, W, W, torch.float32)
    bad = list(args)
    bad[7] = args[7][:3]
    with pytest.raises(RuntimeError, match=r"takes 4 weights \[qkv, o, gate_up, down\], got 3"):
        ext.decoder_layer(*bad)
    bad = list(args)
    bad[10] = 3  # 6 heads of 32 in qkv: 3 query heads would leave 3 for k and v
    with pytest.raises(RuntimeError, match=r"weights\[0\] \(qkv_proj\) has 192 rows, expected \(num_heads \+ 2"):
        ext.decoder_layer(*bad)
    bad = list(args)
    bad[7] = [args[7][0], args[7][1], args[7][2][:-2], args[7][3]]
    with pytest.raises(RuntimeError, match=r"weights\[2\] \(gate_up_proj\) has 190 rows, expected twice"):
        ext.decoder_layer(*bad)
    bad = list(args)
    bad[1] = args[1][:, :32]
    with pytest.raises(RuntimeError, match=r"y has shape \[1, 32\] but h has \[1, 64\]"):
        ext.decoder_layer(*bad)
