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
            "decoder_layer", "decoder_layers", "decoder_forward")
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
    warnings.warn(
        f"gemma3_fast: the compiled extension is not available ({e}); running on the PyTorch reference "
        "path. Build it with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def cuda_kernels_built() -> bool:
    return EXTENSION_AVAILABLE and bool(_C.CUDA_BUILT)


def native_module():
    """The compiled module gemma3_fast._C (for what is not an op: DecodeSession)."""
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

    @torch.library.register_fake(_lib + "kv_cache_write")
    def _(k_cache, v_cache, k, v, positions, ring):
        return None

    @torch.library.register_fake(_lib + "attention")
    def _(q, k, v, k_cache, v_cache, positions, window, scale):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    @torch.library.register_fake(_lib + "linear")
    def _(x, weight, scales=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

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

    @torch.library.register_fake(_lib + "decoder_forward")
    def _(ids, positions, embed_weight, embed_scale, first_norm, inv_freq_local, inv_freq_global, k_caches, v_caches,
          weights, scales, norms, windows, ring, head_weight, head_scales, num_heads, scale, eps, write_cache,
          all_logits):
        return embed_weight.new_empty((ids.shape[0] if all_logits else 1, head_weight.shape[0]))

    # Devices with no compiled kernel (Apple's MPS) run the reference through the same op.
    for _name in OP_NAMES:
        torch.library.register_kernel(_lib + _name, "mps", getattr(reference_ops, _name))


def _extension_ops() -> SimpleNamespace:
    ns = torch.ops.gemma3_fast
    return SimpleNamespace(name="extension", **{n: getattr(ns, n) for n in OP_NAMES})


REFERENCE = SimpleNamespace(name="reference", **{n: getattr(reference_ops, n) for n in OP_NAMES})


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
