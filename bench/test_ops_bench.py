"""Per-op benchmarks: the compiled kernel vs the PyTorch reference vs the best torch built-in.

    pytest bench/test_ops_bench.py --benchmark-only --benchmark-json=bench/raw/ops.json
    python bench/report.py                         # bench/results/ops.md (medians and ratios)

Shapes are the 270M model's: hidden 640, 4 query heads, 1 KV head, head_dim 256, window 512.
Groups: <op>-<dtype>-<shape>; in each group, impl = extension | reference | builtin.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3_fast import ops, reference_ops as ref

ext = torch.ops.gemma3_fast if ops.EXTENSION_AVAILABLE else None
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
IMPLS = ["extension", "reference", "builtin"]
EPS = 1e-6


def rnd(*shape, dtype):
    return torch.randn(*shape).to(dtype)


def run(benchmark, group, impl, fn, *args):
    if impl == "extension" and ext is None:
        pytest.skip("extension not built")
    benchmark.group = group
    benchmark.extra_info["impl"] = impl
    with torch.inference_mode():
        benchmark(fn, *args)


# -- RMSNorm and the fused sandwich norm --------------------------------------------------------------
def builtin_rms_norm(x, w, eps):
    return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + w.float(), eps).to(x.dtype)


def builtin_add_rms_norm(x, res, wpost, wpre, eps):
    h = res + builtin_rms_norm(x, wpost, eps)
    return h, builtin_rms_norm(h, wpre, eps)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", [1, 128, 1024])
@pytest.mark.parametrize("dt", DTYPES)
def test_rms_norm(benchmark, impl, tokens, dt):
    x, w = rnd(tokens, 640, dtype=DTYPES[dt]), rnd(640, dtype=DTYPES[dt])
    fn = {"extension": ext and ext.rms_norm, "reference": ref.rms_norm, "builtin": builtin_rms_norm}[impl]
    run(benchmark, f"rms_norm-{dt}-T{tokens}", impl, fn, x, w, EPS)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", [1, 128, 1024])
@pytest.mark.parametrize("dt", DTYPES)
def test_add_rms_norm(benchmark, impl, tokens, dt):
    d = DTYPES[dt]
    args = (rnd(tokens, 640, dtype=d), rnd(tokens, 640, dtype=d), rnd(640, dtype=d), rnd(640, dtype=d), EPS)
    fn = {"extension": ext and ext.add_rms_norm, "reference": ref.add_rms_norm, "builtin": builtin_add_rms_norm}[impl]
    run(benchmark, f"add_rms_norm-{dt}-T{tokens}", impl, fn, *args)


# -- QK-norm + RoPE --------------------------------------------------------------------------------------
def builtin_qk_norm_rope(q, k, qw, kw, cos, sin, eps):
    def one(x, w):
        x = F.rms_norm(x.float(), (x.shape[-1],), 1.0 + w.float(), eps)
        x1, x2 = x.chunk(2, dim=-1)
        c, s = cos[:, None], sin[:, None]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).to(q.dtype)

    return one(q, qw), one(k, kw)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", [1, 128, 1024])
@pytest.mark.parametrize("dt", DTYPES)
def test_qk_norm_rope(benchmark, impl, tokens, dt):
    d = DTYPES[dt]
    qkv = rnd(tokens, 1536, dtype=d)  # strided views of a fused projection, as in the model
    q, k = qkv[:, :1024].view(tokens, 4, 256), qkv[:, 1024:1280].view(tokens, 1, 256)
    cos, sin = ref.rope_cos_sin(torch.arange(600, 600 + tokens), ref.rope_inv_freq(256, 1e4))
    fn = {"extension": ext and ext.qk_norm_rope, "reference": ref.qk_norm_rope, "builtin": builtin_qk_norm_rope}[impl]
    run(benchmark, f"qk_norm_rope-{dt}-T{tokens}", impl, fn, q, k, rnd(256, dtype=d), rnd(256, dtype=d), cos, sin, EPS)


# -- KV-cache write ----------------------------------------------------------------------------------------
def builtin_kv_cache_write(kc, vc, k, v, positions, ring):
    slots = positions % kc.shape[0]
    kc[slots] = k
    vc[slots] = v


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens", [1, 128])
@pytest.mark.parametrize("dt", DTYPES)
def test_kv_cache_write(benchmark, impl, tokens, dt):
    d = DTYPES[dt]
    kc, vc = rnd(512, 1, 256, dtype=d), rnd(512, 1, 256, dtype=d)
    k, v = rnd(tokens, 1, 256, dtype=d), rnd(tokens, 1, 256, dtype=d)
    pos = torch.arange(1000, 1000 + tokens)
    fn = {"extension": ext and ext.kv_cache_write, "reference": ref.kv_cache_write,
          "builtin": builtin_kv_cache_write}[impl]
    run(benchmark, f"kv_cache_write-{dt}-T{tokens}", impl, fn, kc, vc, k, v, pos, True)


# -- attention over the cache ------------------------------------------------------------------------------
def builtin_attention(q, k, v, kc, vc, positions, window, scale):
    """scaled_dot_product_attention over the gathered keys with a sliding-window mask."""
    start, t, slots = int(positions[0]), q.shape[0], kc.shape[0]
    lo = max(0, start - window + 1) if window else 0
    cached = torch.arange(lo, start)
    keys = torch.cat((kc[cached % slots], k)).transpose(0, 1)  # [Hk, L, D]
    vals = torch.cat((vc[cached % slots], v)).transpose(0, 1)
    kpos = torch.cat((cached, positions))
    mask = kpos[None, :] <= positions[:, None]
    if window:
        mask &= (positions[:, None] - kpos[None, :]) < window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, vals, attn_mask=mask, scale=scale,
                                         enable_gqa=True)
    return out.transpose(0, 1)


ATTN_SHAPES = {  # name: (tokens, start position, window, cache slots)
    "decode-sliding512": (1, 3000, 512, 512),
    "decode-global4096": (1, 4095, 0, 4096),
    "prefill128-sliding512": (128, 1024, 512, 512),
    "prefill1024-sliding512": (1024, 0, 512, 512),
    "prefill1024-global4096": (1024, 2048, 0, 4096),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("dt", DTYPES)
def test_attention(benchmark, impl, shape, dt):
    d = DTYPES[dt]
    t, start, window, slots = ATTN_SHAPES[shape]
    q, k, v = rnd(t, 4, 256, dtype=d), rnd(t, 1, 256, dtype=d), rnd(t, 1, 256, dtype=d)
    kc, vc = rnd(slots, 1, 256, dtype=d), rnd(slots, 1, 256, dtype=d)
    fn = {"extension": ext and ext.attention, "reference": ref.attention, "builtin": builtin_attention}[impl]
    run(benchmark, f"attention-{dt}-{shape}", impl, fn, q, k, v, kc, vc, torch.arange(start, start + t), window,
        1 / 16)


# -- linear: the decode matrix-vector product (every weight byte read once per token) and prefill -------------
LINEAR_SHAPES = {  # name: (tokens, in_features, out_features)
    "decode-qkv": (1, 640, 1536),
    "decode-down": (1, 2048, 640),
    "decode-head": (1, 640, 262144),
    "prefill128-gate_up": (128, 640, 4096),
}


@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("wt", ["fp32", "bf16", "int8"])
def test_linear(benchmark, impl, shape, wt):
    """reference = F.linear in the model dtype (int8: dequantize, then F.linear), as torch alone would do it."""
    from gemma3_fast.quantize import quantize_int8

    t, k, n = LINEAR_SHAPES[shape]
    dtype = torch.float32 if wt == "fp32" else torch.bfloat16
    x, w = rnd(t, k, dtype=dtype), rnd(n, k, dtype=torch.float32)
    scales = None
    if wt == "int8":
        w, scales = quantize_int8(w)
    else:
        w = w.to(dtype)
    fn = {"extension": ext and ext.linear, "reference": ref.linear}[impl]
    run(benchmark, f"linear-{wt}-{shape}", impl, fn, x, w, scales)


GGUF_FORMATS = {"q8_0": (8, 32, 34), "q5_0": (6, 32, 22), "q4_k": (12, 256, 144), "q6_k": (14, 256, 210)}


def gguf_blocks(fmt: str, n: int, k: int) -> torch.Tensor:
    """Random GGUF blocks [n, k / block, bytes] with small fp16 scales (weights of a realistic magnitude)."""
    import numpy as np

    kind, elems, nbytes = GGUF_FORMATS[fmt]
    b = np.random.default_rng(0).integers(0, 256, (n, k // elems, nbytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    if kind == 14:
        b[..., 208:210] = scale
    else:
        b[..., 0:2] = scale
        if kind == 12:
            b[..., 2:4] = scale
    return torch.from_numpy(b)


@pytest.mark.parametrize("impl", ["extension", "builtin"])
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("fmt", GGUF_FORMATS)
def test_linear_gguf(benchmark, impl, shape, fmt):
    """extension = the block kernels on the GGUF blocks; builtin = F.linear on the same weight dequantized to fp32
    once beforehand (what --dtype float32 runs: 3.6-5.8x the bytes per token)."""
    t, k, n = LINEAR_SHAPES[shape]
    if k % GGUF_FORMATS[fmt][1]:
        pytest.skip(f"{fmt} blocks of {GGUF_FORMATS[fmt][1]} do not divide in_features {k}")
    x, w = rnd(t, k, dtype=torch.float32), gguf_blocks(fmt, n, k)
    if impl == "builtin":
        run(benchmark, f"linear-gguf_{fmt}-{shape}", impl, F.linear, x, ref.dequantize(w))
    else:
        run(benchmark, f"linear-gguf_{fmt}-{shape}", impl, ext and ext.linear, x, w)


# -- argmax: greedy decoding's pick over the 262144 logits -------------------------------------------------
@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("dt", DTYPES)
def test_argmax(benchmark, impl, dt):
    """reference = torch.argmax(x, -1) on the logits' own dtype, as greedy sampling called it before."""
    x = rnd(1, 262144, dtype=DTYPES[dt])
    fn = {"extension": ext and ext.argmax, "reference": ref.argmax}[impl]
    run(benchmark, f"argmax-{dt}-decode-vocab", impl, fn, x)


# -- decoder_layer: one whole block at decode (position 600, sliding window 512) ----------------------------
@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("dt", DTYPES)
def test_decoder_layer(benchmark, impl, dt):
    """One call vs the reference composition of the same ops. One block's weights (11 MB in bf16) fit in this
    CPU's L3 cache, so this measures the per-op work, not the weight stream of a real decode step."""
    d, hidden, inter, pos = DTYPES[dt], 640, 2048, 600
    weights = [rnd(n, k, dtype=d) * k ** -0.5 for n, k in ((1536, hidden), (hidden, 1024), (2 * inter, hidden),
                                                           (hidden, inter))]
    norms = [rnd(n, dtype=d) * 0.1 for n in (256, 256, hidden, hidden, hidden, hidden)]
    positions = torch.tensor([pos])
    cos, sin = ref.rope_cos_sin(positions, ref.rope_inv_freq(256, 1e4))
    kc, vc = rnd(512, 1, 256, dtype=d), rnd(512, 1, 256, dtype=d)
    h, y = rnd(1, hidden, dtype=d), rnd(1, hidden, dtype=d)
    fn = {"extension": ext and ext.decoder_layer, "reference": ref.decoder_layer}[impl]
    run(benchmark, f"decoder_layer-{dt}-decode-sliding512", impl, fn, h, y, positions, cos, sin, kc, vc, weights,
        [None] * 4, norms, 4, 512, 256 ** -0.5, EPS, True, True)
