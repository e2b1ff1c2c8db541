"""Training ops: each backward kernel against autograd through its reference, gradcheck of the reference
composition in float64, opcheck with requires_grad, the chunked head loss, and the batched training forward
against the inference forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3_fast import ops, reference_ops as ref
from gemma3_fast.loss import chunked_cross_entropy

pytestmark = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
ext = torch.ops.gemma3_fast if ops.EXTENSION_AVAILABLE else None
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * sum(shape))
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def grads(fn, inputs, grad_outputs, const=()):
    """Gradients of fn(*inputs) (a tensor or tuple) w.r.t. the floating inputs not listed in `const` (indices of
    constants such as RoPE tables), for the given output grads."""
    leaves = [x.detach().clone().requires_grad_(True) if torch.is_tensor(x) and x.is_floating_point()
              and i not in const else x for i, x in enumerate(inputs)]
    out = fn(*leaves)
    out = out if isinstance(out, tuple) else (out,)
    pairs = [(o, g) for o, g in zip(out, grad_outputs) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return [x.grad for x in leaves if torch.is_tensor(x) and x.requires_grad]


def check_backward(ext_fn, ref_fn, inputs, grad_outputs, dtype, const=()):
    """fp32: the kernel's gradients equal autograd through the reference (rtol 1e-4 of each gradient's scale).
    bf16: the kernel's error against the fp32 reference gradient is at most 2x the bf16 reference's (which rounds
    once, at the end) plus one bf16 ulp of the gradient's scale: a backward reads bf16 tensors the forward saved
    (attention's output, the activations), each already one rounding away from fp32."""
    got = grads(ext_fn, inputs, grad_outputs, const)
    want = grads(ref_fn, inputs, grad_outputs, const)
    assert len(got) == len(want) and all(g is not None for g in got)
    if dtype == torch.float32:
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * w.abs().max().item() + 1e-6)
        return
    up = [x.float() if torch.is_tensor(x) and x.is_floating_point() and x.dtype != torch.float32 else x for x in inputs]
    want32 = grads(ref_fn, up, [None if g is None else g.float() for g in grad_outputs], const)
    for g, w, w32 in zip(got, want, want32):
        assert g.dtype == w.dtype
        kernel_err = (g.float() - w32).abs().max().item()
        torch_err = (w.float() - w32).abs().max().item()
        # + 1e-6: where the exact gradient is 0 (one key: softmax is 1 whatever the score), torch's bf16 path
        # gives exactly 0 and a kernel's fp32 sums leave a rounding residue (~2e-7 on the scalar build).
        assert kernel_err <= 2 * torch_err + 2 ** -8 * w32.abs().max().item() + 1e-6, (kernel_err, torch_err)


# -- norms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (7, 640), (2, 3, 64), (4, 13)])
def test_rms_norm_backward(shape, dtype):
    x, w = randn(*shape, dtype=dtype, scale=3), randn(shape[-1], dtype=dtype, scale=0.5, seed=1)
    check_backward(ext.rms_norm, ref.rms_norm, (x, w, 1e-6), [randn(*shape, dtype=dtype, seed=2)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 640), (9, 640), (2, 5, 64), (4, 13)])
@pytest.mark.parametrize("grads_of", ["both", "y_only"])
def test_add_rms_norm_backward(shape, dtype, grads_of):
    x, res = randn(*shape, dtype=dtype, scale=20), randn(*shape, dtype=dtype, scale=5, seed=1)
    wpost, wpre = randn(shape[-1], dtype=dtype, seed=2), randn(shape[-1], dtype=dtype, seed=3)
    gh = randn(*shape, dtype=dtype, seed=4) if grads_of == "both" else None  # the last block's h is unused
    check_backward(ext.add_rms_norm, ref.add_rms_norm, (x, res, wpost, wpre, 1e-6),
                   [gh, randn(*shape, dtype=dtype, seed=5)], dtype)


# -- QK-norm + RoPE ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,t,hq,hk,d", [(None, 7, 4, 1, 256), (None, 3, 2, 2, 18), (3, 5, 4, 1, 32),
                                             (2, 33, 8, 2, 64)])
def test_qk_norm_rope_backward(batch, t, hq, hk, d, dtype):
    lead = () if batch is None else (batch,)
    # q and k as the model makes them: strided views of one fused projection.
    qkv = randn(*lead, t, (hq + 2 * hk) * d, dtype=dtype, scale=4)
    q, k, _ = qkv.split((hq * d, hk * d, hk * d), dim=-1)
    q, k = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d))
    qw, kw = randn(d, dtype=dtype, scale=0.5, seed=6), randn(d, dtype=dtype, scale=0.5, seed=7)
    cos, sin = ref.rope_cos_sin(torch.arange(t), ref.rope_inv_freq(d, 1e4))
    gq, gk = randn(*lead, t, hq, d, dtype=dtype, seed=8), randn(*lead, t, hk, d, dtype=dtype, seed=9)
    fwd = ext.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    for o, r in zip(fwd, ref.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)):
        torch.testing.assert_close(o.float(), r.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=2e-2 if dtype == torch.bfloat16 else 2e-5)
    check_backward(ext.qk_norm_rope, ref.qk_norm_rope, (q, k, qw, kw, cos, sin, 1e-6), [gq, gk], dtype,
                   const=(4, 5))


# -- gated gelu ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (5, 2 * 2048), (2, 3, 2 * 96), (3, 2 * 13)])
def test_gelu_tanh_mul_forward_and_backward(shape, dtype):
    gate_up = randn(*shape, dtype=dtype, scale=3)
    out = ext.gelu_tanh_mul(gate_up)
    want, want32 = ref.gelu_tanh_mul(gate_up), ref.gelu_tanh_mul(gate_up.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    else:
        assert (out.float() - want32).abs().max() <= 2 * (want.float() - want32).abs().max() + 1e-6
    grad = randn(*shape[:-1], shape[-1] // 2, dtype=dtype, seed=1)
    check_backward(ext.gelu_tanh_mul, ref.gelu_tanh_mul, (gate_up,), [grad], dtype)


# -- causal attention ----------------------------------------------------------------------------------
ATTN_CASES = [
    # batch, tokens, q heads, kv heads, head_dim, window
    (1, 1, 4, 1, 32, 8),  # position 0 alone
    (2, 5, 4, 1, 32, 8),  # T < window
    (2, 20, 4, 1, 32, 8),  # T > window
    (1, 70, 4, 2, 24, 0),  # global; T not a multiple of the 32-query or 64-key blocks
    (3, 150, 2, 1, 16, 64),  # T > window, crossing key blocks
    (1, 130, 4, 1, 256, 0),  # real head_dim
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,t,hq,hk,d,window", ATTN_CASES)
def test_causal_attention_forward_and_backward(b, t, hq, hk, d, window, dtype):
    q = randn(b, t, hq, d, dtype=dtype, scale=2)
    k, v = randn(b, t, hk, d, dtype=dtype, seed=1), randn(b, t, hk, d, dtype=dtype, seed=2)
    scale = d ** -0.5
    out, lse = ext.causal_attention(q, k, v, window, scale)
    ref_out, ref_lse = ref.causal_attention(q, k, v, window, scale)
    assert lse.dtype == torch.float32 and lse.shape == (b, t, hq)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-4)
    tol = dict(rtol=1e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    # The batched reference is attention() per row over an empty cache: the inference op agrees too.
    empty = k.new_zeros(0, hk, d)
    torch.testing.assert_close(out[-1].float(), ext.attention(q[-1], k[-1], v[-1], empty, empty, torch.arange(t),
                                                              window, scale).float(), **tol)
    check_backward(lambda *a: ext.causal_attention(*a)[0], lambda *a: ref.causal_attention(*a)[0],
                   (q, k, v, window, scale), [randn(b, t, hq, d, dtype=dtype, seed=3)], dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_causal_attention_backward_threads_agree(threads):
    """dQ is summed from per-thread copies: one thread and two must give the same gradients."""
    q, k, v = randn(2, 150, 4, 32), randn(2, 150, 1, 32, seed=1), randn(2, 150, 1, 32, seed=2)
    go = randn(2, 150, 4, 32, seed=3)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = grads(lambda *a: ext.causal_attention(*a)[0], (q, k, v, 64, 0.2), [go])
    finally:
        torch.set_num_threads(old)
    want = grads(lambda *a: ref.causal_attention(*a)[0], (q, k, v, 64, 0.2), [go])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# -- loss ----------------------------------------------------------------------------------------------
def test_softmax_cross_entropy_in_place():
    # 21 tokens: two bands of columns on two threads, a tail of 5 after the 8-wide vectors; 1300 vocabulary rows:
    # three tiles, the last one short. Large logits: the running max moves between tiles.
    logits = randn(21, 1300, scale=5)
    logits[2, 1200] = 80.0  # the max in the last tile
    targets = torch.randint(0, 1300, (21,), generator=torch.Generator().manual_seed(0))
    targets[[0, 1, 3]] = torch.tensor([0, 1299, -100])
    a, b = logits.t().contiguous(), logits.t().contiguous()
    la, lb = ext.softmax_cross_entropy_(a, targets, 0.25, -100), ref.softmax_cross_entropy_(b, targets, 0.25, -100)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    want = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(la, want, rtol=1e-5, atol=1e-5)
    assert la[3] == 0 and a[:, 3].abs().max() == 0
    with pytest.raises(RuntimeError, match=r"targets\[1\] = 1300 is outside the vocabulary \[0, 1300\)"):
        ext.softmax_cross_entropy_(a.clone(), torch.tensor([0, 1300] + [0] * 19), 1.0, -100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_elements", [1 << 26, 3 * 500])  # one chunk; chunks of 3 rows (last one short)
def test_chunked_cross_entropy_equals_full_logits(dtype, chunk_elements, monkeypatch):
    import gemma3_fast.loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    hidden, weight = randn(11, 64, dtype=dtype), randn(500, 64, scale=0.3, seed=1)
    targets = torch.randint(0, 500, (11,), generator=torch.Generator().manual_seed(0))
    targets[4] = -100
    train_ops = ops.training_ops("extension", "cpu")

    def full(h, w, t):
        return F.cross_entropy(F.linear(h, w.to(h.dtype)).float(), t, ignore_index=-100)

    got_loss = chunked_cross_entropy(hidden, weight, targets, train_ops)
    with torch.no_grad():  # evaluation: the same loss (the gradient GEMMs are skipped)
        torch.testing.assert_close(chunked_cross_entropy(hidden.requires_grad_(True), weight, targets, train_ops),
                                   got_loss)
    hidden = hidden.detach()
    torch.testing.assert_close(got_loss, full(hidden, weight, targets), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=1e-5)
    for scale in (1.0, 0.5):  # 0.5: gradient accumulation scales the loss
        check_backward(lambda h, w: scale * chunked_cross_entropy(h, w, targets, train_ops),
                       lambda h, w: scale * full(h, w, targets), (hidden, weight), [torch.tensor(1.0)], dtype)


# -- opcheck: schemas, fake kernels and autograd registrations ------------------------------------------
def _training_op_samples():
    x, w = randn(3, 64), randn(64, seed=1)
    qkv = randn(2, 5, 6 * 32, seed=2)
    q, k, _ = qkv.split((128, 32, 32), dim=-1)
    cos, sin = ref.rope_cos_sin(torch.arange(5), ref.rope_inv_freq(32, 1e4))
    qa, ka, va = randn(2, 9, 4, 32, seed=3), randn(2, 9, 1, 32, seed=4), randn(2, 9, 1, 32, seed=5)
    return [
        (ext.rms_norm.default, (x, w, 1e-6)),
        (ext.add_rms_norm.default, (x, randn(3, 64, seed=6), w, w, 1e-6)),
        (ext.qk_norm_rope.default, (q.unflatten(-1, (4, 32)), k.unflatten(-1, (1, 32)), w[:32], w[:32], cos, sin,
                                    1e-6)),
        (ext.gelu_tanh_mul.default, (randn(2, 3, 64, seed=7),)),
        (ext.causal_attention.default, (qa, ka, va, 4, 0.2)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck_with_requires_grad(i):
    op, args = _training_op_samples()[i]
    args = tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point()
                 and a.dtype == torch.float32 and a.shape[-1] != 16 else a for a in args)  # cos/sin: constants
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    x, w = randn(3, 64), randn(64, seed=1)
    qa, ka, va = randn(2, 9, 4, 32, seed=3), randn(2, 9, 1, 32, seed=4), randn(2, 9, 1, 32, seed=5)
    out, lse = ext.causal_attention(qa, ka, va, 4, 0.2)
    cos, sin = ref.rope_cos_sin(torch.arange(9), ref.rope_inv_freq(32, 1e4))
    for op, args in [
        (ext.rms_norm_backward.default, (randn(3, 64, seed=2), x, w, 1e-6)),
        (ext.add_rms_norm_backward.default, (randn(3, 64, seed=2), randn(3, 64, seed=3), x, x, w, w, 1e-6)),
        (ext.qk_norm_rope_backward.default, (qa, ka, qa, ka, w[:32], w[:32], cos, sin, 1e-6)),
        (ext.gelu_tanh_mul_backward.default, (randn(3, 32), randn(3, 64, seed=9))),
        (ext.causal_attention_backward.default, (randn(2, 9, 4, 32, seed=6), qa, ka, va, out, lse, 4, 0.2)),
        (ext.softmax_cross_entropy_.default, (randn(50, 4), torch.tensor([1, 2, -100, 49]), 0.5, -100)),
    ]:
        torch.library.opcheck(op, args)


# -- the reference composition is differentiable: gradcheck in float64 ----------------------------------
def test_gradcheck_reference_block_float64():
    d, hq, hk, hidden, inter, t = 8, 2, 1, 16, 12, 5
    g = torch.Generator().manual_seed(0)

    def p(*shape, s=0.3):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_(True)

    weights = [p((hq + 2 * hk) * d, hidden), p(hidden, hq * d), p(2 * inter, hidden), p(hidden, inter)]
    norms = [p(d), p(d), p(hidden), p(hidden), p(hidden), p(hidden)]
    h, y = p(2, t, hidden, s=1.0), p(2, t, hidden, s=1.0)
    cos, sin = ref.rope_cos_sin(torch.arange(t), ref.rope_inv_freq(d, 1e4))

    def block(h, y, *params):
        def attend(q, k, v):
            return ref.causal_attention(q, k, v, 3, 0.3)[0]

        return ref.decoder_block(ref, h, y, cos, sin, attend, list(params[:4]), [None] * 4, list(params[4:]), hq,
                                 1e-6)

    assert torch.autograd.gradcheck(block, (h, y, *weights, *norms), eps=1e-6, atol=1e-5)


# -- bad inputs ----------------------------------------------------------------------------------------
def test_training_ops_bad_inputs():
    q, k = randn(2, 9, 4, 32), randn(2, 9, 1, 32, seed=1)
    with pytest.raises(RuntimeError, match=r"q must be 4-D \[batch, tokens, q_heads, head_dim\]"):
        ext.causal_attention(q[0], k[0], k[0], 4, 0.2)
    with pytest.raises(RuntimeError, match=r"q_heads \(4\) must be a multiple of kv_heads \(3\)"):
        ext.causal_attention(q, randn(2, 9, 3, 32), randn(2, 9, 3, 32), 4, 0.2)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        ext.causal_attention(q, k, k, -1, 0.2)
    with pytest.raises(RuntimeError, match=r"lse has shape \[2, 9\], expected \[2, 9, 4\]"):
        ext.causal_attention_backward(q, q, k, k, q, randn(2, 9), 4, 0.2)
    with pytest.raises(RuntimeError, match="must end in an even, non-empty dimension"):
        ext.gelu_tanh_mul(randn(3, 7))
    with pytest.raises(RuntimeError, match=r"grad has shape \[3, 4\], expected \[3, 8\]"):
        ext.gelu_tanh_mul_backward(randn(3, 4), randn(3, 16))
    with pytest.raises(RuntimeError, match=r"grad has shape \[2, 64\] but x has \[3, 64\]"):
        ext.rms_norm_backward(randn(2, 64), randn(3, 64), randn(64), 1e-6)
    with pytest.raises(RuntimeError, match="k must have as many dims as q"):
        ext.qk_norm_rope(q, k[0], randn(32), randn(32), randn(9, 16), randn(9, 16), 1e-6)
