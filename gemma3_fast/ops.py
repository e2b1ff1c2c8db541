"""The one place the model gets its fused operators from: the compiled extension or the PyTorch reference.

The extension (gemma3_fast._C, built from csrc/) defines the ops `torch.ops.gemma3_fast.*` in one
TORCH_LIBRARY block with CPU (and, when built, CUDA) kernels. Here we add fake kernels so torch.compile
can trace them, and register the reference implementations for devices with no kernel (MPS).
"""

from __future__ import annotations

import os
import warnings
from types import SimpleNamespace

import torch

from . import reference_ops

OP_NAMES = ("rms_norm", "add_rms_norm", "qk_norm_rope", "kv_cache_write", "attention", "linear", "argmax",
            "decoder_layer", "decoder_layers", "decoder_forward", "decoder_forward_batched", "gelu_tanh_mul",
            "causal_attention", "softmax_cross_entropy_", "dequantize")
# The ops a training step runs (reference_ops.decoder_block's op set plus the batched attention); in the
# extension each has a registered autograd formula whose backward is a C++ op.
TRAINING_OP_NAMES = ("linear", "rms_norm", "add_rms_norm", "qk_norm_rope", "gelu_tanh_mul", "causal_attention",
                     "softmax_cross_entropy_")
BACKENDS = ("auto", "extension", "reference")

try:
    if os.environ.get("GEMMA3_FAST_DISABLE_EXTENSION") == "1":
        raise ImportError("disabled by GEMMA3_FAST_DISABLE_EXTENSION=1")
    from . import _C  # noqa: F401  (loading the library registers torch.ops.gemma3_fast.*)

    EXTENSION_AVAILABLE = True
    EXTENSION_ERROR = None
except ImportError as e:  # package used from a checkout without a build, or a broken build
    EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = str(e)
    # setup.py leaves this note when the install went on without the extension (its build failed).
    _build_error = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build_error.txt")
    if os.path.exists(_build_error) and "GEMMA3_FAST_DISABLE_EXTENSION" not in EXTENSION_ERROR:
        with open(_build_error) as f:
            EXTENSION_ERROR = f"the install could not build it: {f.read().strip()}"
    warnings.warn(
        f"gemma3_fast: the compiled extension is not available ({EXTENSION_ERROR}); running on the PyTorch "
        "reference path. Build it with `pip install --no-build-isolation .` (`pip install -v` shows the "
        "compiler's messages)",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_kernels_built() -> bool:
    return EXTENSION_AVAILABLE and bool(_C.CUDA_BUILT)


GGUF_ACTIVATIONS = ("fp32", "int16")


def set_gguf_activations(mode: str) -> None:
    """How the decode kernels of GGUF block weights treat activations, process-wide: "fp32" (the default) keeps
    them exact; "int16" quantizes each token's activations to int16 first, as the int8 weights' kernel does
    (about 1.1x faster decode; logits within ~1e-5 of the sum of |x w|, docs/PERFORMANCE.md). Prefill is fp32
    either way."""
    if mode not in GGUF_ACTIVATIONS:
        raise ValueError(f"GGUF activations must be one of {GGUF_ACTIVATIONS}, got {mode!r}")
    if not EXTENSION_AVAILABLE:
        if mode == "int16":
            raise RuntimeError(f"int16 GGUF activations need the compiled extension ({EXTENSION_ERROR})")
        return
    if mode == "int16" and not _C.GGUF_INT16_ACTIVATIONS:
        raise RuntimeError(f"int16 GGUF activations have kernels only in AVX2 builds; this build's SIMD is "
                           f"{_C.SIMD}: use --gguf-activations fp32")
    _C.set_gguf_int16_activations(mode == "int16")


def native_module():
    """The compiled module gemma3_fast._C (for what is not an op: DecodeSession, BpeTokenizer)."""
    if not EXTENSION_AVAILABLE:
        raise RuntimeError(f"gemma3_fast: the compiled extension is not available ({EXTENSION_ERROR})")
    return _C


if EXTENSION_AVAILABLE:
    _lib = "gemma3_fast::"

    @torch.library.register_fake(_lib + "rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake(_lib + "add_rms_norm")
    def _(x, residual, post_weight, pre_weight, eps):
        return torch.empty_like(x), torch.empty_like(x)

    @torch.library.register_fake(_lib + "qk_norm_rope")
    def _(q, k, q_weight, k_weight, cos, sin, eps):
        return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
            k, memory_format=torch.contiguous_format)

    @torch.library.register_fake(_lib + "gelu_tanh_mul")
    def _(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    @torch.library.register_fake(_lib + "gelu_tanh_mul_backward")
    def _(grad, gate_up):
        return torch.empty_like(gate_up, memory_format=torch.contiguous_format)

    @torch.library.register_fake(_lib + "causal_attention")
    def _(q, k, v, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3],
                                                                                        dtype=torch.float32)

    @torch.library.register_fake(_lib + "causal_attention_backward")
    def _(grad_out, q, k, v, out, lse, window, scale):
        return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))

    @torch.library.register_fake(_lib + "softmax_cross_entropy_")
    def _(logits_t, targets, grad_scale, ignore_index):
        return logits_t.new_empty(logits_t.shape[1:])

    @torch.library.register_fake(_lib + "rms_norm_backward")
    def _(grad, x, weight, eps):
        return torch.empty_like(x), torch.empty_like(weight)

    @torch.library.register_fake(_lib + "add_rms_norm_backward")
    def _(grad_h, grad_y, x, h, post_weight, pre_weight, eps):
        return torch.empty_like(x), torch.empty_like(x), torch.empty_like(post_weight), torch.empty_like(pre_weight)

    @torch.library.register_fake(_lib + "qk_norm_rope_backward")
    def _(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps):
        return (torch.empty_like(q, memory_format=torch.contiguous_format),
                torch.empty_like(k, memory_format=torch.contiguous_format), torch.empty_like(q_weight),
                torch.empty_like(k_weight))

    @torch.library.register_fake(_lib + "kv_cache_write")
    def _(k_cache, v_cache, k, v, positions, ring):
        return None

    @torch.library.register_fake(_lib + "attention")
    def _(q, k, v, k_cache, v_cache, positions, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake(_lib + "linear")
    def _(x, weight, scales=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(_lib + "dequantize")
    def _(blocks):
        from .gguf_blocks import in_features

        return blocks.new_empty((blocks.shape[0], in_features(blocks)), dtype=torch.float32)

    @torch.library.register_fake(_lib + "argmax")
    def _(x):
        return x.new_empty(x.shape[:-1], dtype=torch.long)

    @torch.library.register_fake(_lib + "decoder_layer")
    def _(h, y, positions, cos, sin, k_cache, v_cache, weights, scales, norms, num_heads, window, scale, eps, ring,
          write_cache):
        return torch.empty_like(h), torch.empty_like(h)

    @torch.library.register_fake(_lib + "decoder_layers")
    def _(h, y, positions, rope, k_caches, v_caches, weights, scales, norms, windows, ring, num_heads, scale, eps,
          write_cache):
        return torch.empty_like(h), torch.empty_like(h)

    def _activation_dtype(embed_weight, first_norm):  # GGUF blocks: fp32; the int8 head as table: the norms'
        if embed_weight.is_floating_point():
            return embed_weight.dtype
        return first_norm.dtype if embed_weight.dtype == torch.int8 else torch.float32

    @torch.library.register_fake(_lib + "decoder_forward")
    def _(ids, positions, embed_weight, embed_scale, first_norm, inv_freq_local, inv_freq_global, k_caches, v_caches,
          weights, scales, norms, windows, ring, head_weight, head_scales, num_heads, scale, eps, write_cache,
          all_logits):
        return embed_weight.new_empty((ids.shape[0] if all_logits else 1, head_weight.shape[0]),
                                      dtype=_activation_dtype(embed_weight, first_norm))

    @torch.library.register_fake(_lib + "decoder_forward_batched")
    def _(ids, positions, embed_weight, embed_scale, first_norm, inv_freq_local, inv_freq_global, k_caches, v_caches,
          weights, scales, norms, windows, ring, head_weight, head_scales, num_heads, scale, eps):
        return embed_weight.new_empty((ids.shape[0], head_weight.shape[0]),
                                      dtype=_activation_dtype(embed_weight, first_norm))

    # Devices with no compiled kernel (Apple's MPS) run the reference through the same op.
    for _name in OP_NAMES:
        torch.library.register_kernel(_lib + _name, "mps", getattr(reference_ops, _name))

    # -- autograd: setup_context saves what the backward op needs; the backward is one C++ op per fused op --
    _ns = torch.ops.gemma3_fast

    def _save(ctx, tensors, **consts):
        ctx.save_for_backward(*tensors)
        ctx.__dict__.update(consts)

    torch.library.register_autograd(
        _lib + "rms_norm",
        lambda ctx, grad: (*_ns.rms_norm_backward(grad, *ctx.saved_tensors, ctx.eps), None),
        setup_context=lambda ctx, inputs, output: _save(ctx, inputs[:2], eps=inputs[2]))

    def _add_rms_norm_backward(ctx, grad_h, grad_y):
        x, h, post, pre = ctx.saved_tensors
        return (*_ns.add_rms_norm_backward(grad_h, grad_y, x, h, post, pre, ctx.eps), None)

    torch.library.register_autograd(
        _lib + "add_rms_norm", _add_rms_norm_backward,
        setup_context=lambda ctx, inputs, output: _save(ctx, (inputs[0], output[0], inputs[2], inputs[3]),
                                                        eps=inputs[4]))

    def _qk_norm_rope_backward(ctx, grad_q, grad_k):
        return (*_ns.qk_norm_rope_backward(grad_q, grad_k, *ctx.saved_tensors, ctx.eps), None, None, None)

    torch.library.register_autograd(
        _lib + "qk_norm_rope", _qk_norm_rope_backward,
        setup_context=lambda ctx, inputs, output: _save(ctx, inputs[:6], eps=inputs[6]))

    torch.library.register_autograd(
        _lib + "gelu_tanh_mul", lambda ctx, grad: _ns.gelu_tanh_mul_backward(grad, *ctx.saved_tensors),
        setup_context=lambda ctx, inputs, output: _save(ctx, inputs[:1]))

    def _causal_attention_setup(ctx, inputs, output):
        q, k, v, window, scale = inputs
        ctx.mark_non_differentiable(output[1])
        _save(ctx, (q, k, v, *output), window=window, scale=scale)

    def _causal_attention_backward(ctx, grad_out, _grad_lse):
        return (*_ns.causal_attention_backward(grad_out, *ctx.saved_tensors, ctx.window, ctx.scale), None, None)

    torch.library.register_autograd(_lib + "causal_attention", _causal_attention_backward,
                                    setup_context=_causal_attention_setup)


def _extension_ops() -> SimpleNamespace:
    ns = torch.ops.gemma3_fast
    return SimpleNamespace(name="extension", **{n: getattr(ns, n) for n in OP_NAMES})


REFERENCE = SimpleNamespace(name="reference", **{n: getattr(reference_ops, n) for n in OP_NAMES})


def _extension_training_ops() -> SimpleNamespace:
    ns = torch.ops.gemma3_fast

    # Weights are cast to the activations' dtype (a no-op in fp32; bf16 training keeps fp32 master weights and
    # the cast carries their gradient back). Projections are torch's matmul (the reference linear).
    def add_rms_norm(x, residual, post_weight, pre_weight, eps):
        return ns.add_rms_norm(x, residual, post_weight.to(x.dtype), pre_weight.to(x.dtype), eps)

    def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
        return ns.qk_norm_rope(q, k, q_weight.to(q.dtype), k_weight.to(q.dtype), cos, sin, eps)

    return SimpleNamespace(
        name="extension", linear=reference_ops.linear, add_rms_norm=add_rms_norm, qk_norm_rope=qk_norm_rope,
        rms_norm=lambda x, weight, eps: ns.rms_norm(x, weight.to(x.dtype), eps),
        gelu_tanh_mul=ns.gelu_tanh_mul, softmax_cross_entropy_=ns.softmax_cross_entropy_,
        causal_attention=lambda q, k, v, window, scale: ns.causal_attention(q, k, v.contiguous(), window, scale)[0])


REFERENCE_TRAINING = SimpleNamespace(
    name="reference", **{n: getattr(reference_ops, n) for n in TRAINING_OP_NAMES if n != "causal_attention"},
    causal_attention=lambda q, k, v, window, scale: reference_ops.causal_attention(q, k, v, window, scale)[0])


def training_ops(backend: str, device: torch.device | str) -> SimpleNamespace:
    """The differentiable op set of a training step (TRAINING_OP_NAMES; causal_attention returns only the output):
    the extension's ops with their C++ backward on the CPU, else the reference under torch's autograd."""
    ops = resolve_backend(backend, device)
    if ops.name == "extension" and torch.device(device).type == "cpu":
        return _extension_training_ops()
    return REFERENCE_TRAINING


def resolve_backend(backend: str, device: torch.device | str) -> SimpleNamespace:
    """The op set for `backend` on `device`; 'auto' takes the extension wherever it has kernels."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "reference":
        return REFERENCE
    has_kernels = EXTENSION_AVAILABLE and (
        device.type in ("cpu", "mps") or (device.type == "cuda" and cuda_kernels_built()))
    if backend == "extension":
        if not EXTENSION_AVAILABLE:
            raise RuntimeError(
                f"--backend extension: the compiled extension gemma3_fast._C is not available ({EXTENSION_ERROR}). "
                "Install with `pip install --no-build-isolation .` or use --backend reference.")
        if not has_kernels:
            raise RuntimeError(f"--backend extension: the extension was built without kernels for {device.type}")
        return _extension_ops()
    return _extension_ops() if has_kernels else REFERENCE
