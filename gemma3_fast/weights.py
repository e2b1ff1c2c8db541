"""Hugging Face checkpoint tensors -> a Gemma3Model: name mapping, shape checks, fusing, dtype."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import Gemma3Config
from .gguf_blocks import concat_rows, dequantize, in_features, is_blocks
from .huge_pages import enabled as huge_pages_enabled
from .huge_pages import huge_page_buffer, place_on_huge_pages, release_freed_memory
from .model import Gemma3Model, Linear

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Prefixes under which the text model's tensors appear (plain, and inside multimodal checkpoints).
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")

# Per-block tensors: HF name suffix -> (our name, fused group or None).
_BLOCK_NORMS = {
    "input_layernorm.weight": "input_norm",
    "post_attention_layernorm.weight": "post_attn_norm",
    "pre_feedforward_layernorm.weight": "pre_ff_norm",
    "post_feedforward_layernorm.weight": "post_ff_norm",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
}


class WeightsError(ValueError):
    """A checkpoint that does not match the config: the message names the file and the tensor."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    else:
        name = dtype
    if name in ("float16", "half"):
        raise ValueError("dtype float16 is not supported: Gemma 3 activations overflow fp16 (NaN output). "
                         "Use float32 or bfloat16.")
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(SUPPORTED_DTYPES)}, got {name!r}")
    return SUPPORTED_DTYPES[name]


def expected_hf_shapes(c: Gemma3Config) -> dict[str, tuple[int, ...]]:
    h, d = c.hidden_size, c.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, h), "norm.weight": (h,)}
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c.num_attention_heads * d, h),
            p + "self_attn.k_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.v_proj.weight": (c.num_key_value_heads * d, h),
            p + "self_attn.o_proj.weight": (h, c.num_attention_heads * d),
            p + "mlp.gate_proj.weight": (c.intermediate_size, h),
            p + "mlp.up_proj.weight": (c.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, c.intermediate_size),
        })
        for suffix in _BLOCK_NORMS:
            shapes[p + suffix] = (d,) if suffix.startswith("self_attn.") else (h,)
    return shapes


def _strip_prefix(name: str) -> str | None:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def build_model(config: Gemma3Config, get_tensor: Callable[..., torch.Tensor], names: list[str], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                backend: str = "auto", quantize: str = "none") -> Gemma3Model:
    """Assemble a model from checkpoint tensors (HF names), reading each once via `get_tensor(name)`.

    quantize="int8" quantizes each linear weight, and the embedding as the tied output head, as soon as it is read,
    so the full-precision model never exists in memory at once; the int8 head then serves the embedding lookups
    too (its rows times their scales)."""
    from .quantize import QUANT_MODES, quant_rows, quantize_int8

    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
    shapes = expected_hf_shapes(config)
    index = {}
    for name in names:
        short = _strip_prefix(name)
        if short in shapes:
            index[short] = name
    missing = [n for n in shapes if n not in index]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{source}: missing tensor(s) {['model.' + m for m in missing[:5]]}{more}")

    def load(short: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = get_tensor(index[short], dtype, out=out)
        if is_blocks(t) or (t.dtype == torch.bfloat16 and getattr(get_tensor, "native", False)):
            # GGUF blocks, and a GGUF's BF16 projections on the native path: used as they are, in place
            rows, cols = shapes[short] if len(shapes[short]) == 2 else (-1, -1)
            if t.shape[0] != rows or in_features(t) != cols or t.dim() not in (2, 3):
                raise WeightsError(f"{source}: tensor {index[short]!r} holds [{t.shape[0]}, {in_features(t)}] "
                                   f"weights, but the config implies {shapes[short]}")
            return t
        if tuple(t.shape) != shapes[short]:
            raise WeightsError(f"{source}: tensor {index[short]!r} has shape {tuple(t.shape)}, but config.json "
                               f"implies {shapes[short]}")
        if not t.is_floating_point():
            raise WeightsError(f"{source}: tensor {index[short]!r} has dtype {t.dtype}, expected a float type")
        return t.to(dtype)

    # The embedding (the largest tensor: 671 MB in fp32), or the int8 head made of it, written straight onto huge
    # pages: copied there afterwards, like the others, it and its copy would both be in memory at the peak of
    # loading. `placed`: the data pointers already there.
    placed: set[int] = set()
    direct = getattr(get_tensor, "reads_into", False) and torch.device(device).type == "cpu" and huge_pages_enabled()

    def new_big(shape: tuple[int, int], dt: torch.dtype) -> torch.Tensor:
        if not direct:
            return torch.empty(shape, dtype=dt)
        t = huge_page_buffer(shape[0] * shape[1] * dt.itemsize).view(dt).view(shape)
        placed.add(t.data_ptr())
        return t

    def quantized_as_read(short: str) -> tuple[torch.Tensor, torch.Tensor]:
        """quantize_int8 of the tensor, read and quantized a chunk of rows at a time: the same values as quantizing
        it whole, without its full-precision copy (the bf16 embedding, 335 MB, was the peak of an int8 load)."""
        name, shape = index[short], tuple(get_tensor.shape_of(index[short]))
        if shape != shapes[short]:
            raise WeightsError(f"{source}: tensor {name!r} has shape {shape}, but config.json implies "
                               f"{shapes[short]}")
        q, scales = new_big(shape, torch.int8), torch.empty(shape[0])
        rows = quant_rows(shape[1])
        for a in range(0, shape[0], rows):
            part = get_tensor(name, dtype, rows=(a, min(a + rows, shape[0])))
            if not part.is_floating_point():
                raise WeightsError(f"{source}: tensor {name!r} has dtype {part.dtype}, expected a float type")
            q[a:a + rows], scales[a:a + rows] = quantize_int8(part.to(dtype))
        return q, scales

    state: dict[str, torch.Tensor] = {}
    if quantize == "int8" and getattr(get_tensor, "shape_of", None) is not None:  # a reader by rows
        head, scales = quantized_as_read("embed_tokens.weight")  # the int8 head: the lookups' table too
        state.update({"embed_tokens.weight": head, "lm_head.weight": head, "lm_head.scales": scales})
    else:
        on_pages = direct and quantize != "int8"  # not a table that is quantized and dropped
        state["embed_tokens.weight"] = load("embed_tokens.weight",
                                            new_big(shapes["embed_tokens.weight"], dtype) if on_pages else None)
        if quantize == "int8":  # the tied head, quantized; it is the lookups' table too
            state["lm_head.weight"], state["lm_head.scales"] = quantize_int8(state["embed_tokens.weight"])
            state["embed_tokens.weight"] = state["lm_head.weight"]
        else:
            state["lm_head.weight"] = state["embed_tokens.weight"]
    state["final_norm"] = load("norm.weight")
    release_freed_memory()

    release = getattr(get_tensor, "release", None)  # a GGUF mapping: drop the pages of what was copied out

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:  # fused projections; block weights kept as blocks
        if all(is_blocks(t) for t in parts):
            out = concat_rows(parts)
        else:
            out = torch.cat([dequantize(t).to(dtype) if is_blocks(t) else t for t in parts])
        for t in parts if release is not None else ():
            release(t)
        return out

    def put_linear(name: str, shorts: list[str]) -> None:
        """The projection `name`: the tensors `shorts` one above the other (q|k|v, gate|up fused by rows)."""
        if quantize != "int8":
            state[name + ".weight"] = cat([load(x) for x in shorts]) if len(shorts) > 1 else load(shorts[0])
            return
        parts = []
        for x in shorts:  # each quantized as it is read (per-row scales: the same as quantizing them fused),
            parts.append(quantize_int8(load(x)))
            release_freed_memory()  # and its temporaries handed back at once: they were an int8 load's peak
        state[name + ".weight"] = torch.cat([q for q, _ in parts])
        state[name + ".scales"] = torch.cat([sc for _, sc in parts])

    for i in range(config.num_hidden_layers):
        p = f"layers.{i}."
        put_linear(p + "qkv_proj", [p + f"self_attn.{x}_proj.weight" for x in "qkv"])
        put_linear(p + "o_proj", [p + "self_attn.o_proj.weight"])
        put_linear(p + "gate_up_proj", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
        put_linear(p + "down_proj", [p + "mlp.down_proj.weight"])
        for suffix, ours in _BLOCK_NORMS.items():
            state[p + ours] = load(p + suffix)
        release_freed_memory()  # a layer's temporaries: left to the heap they piled up, +300 MB in some loads

    with torch.device("meta"):
        model = Gemma3Model(config, backend="reference")
    model.requires_grad_(False)  # inference only; int8 parameters cannot require grad
    if quantize == "int8":
        for module in model.modules():
            if isinstance(module, Linear):
                module.scales = torch.empty(module.weight.shape[0], device="meta")
    for name, t in state.items():  # block weights have their own shape and dtype: meta placeholders to match
        if is_blocks(t):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(owner, "weight", nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False))
    model.load_state_dict(state, strict=True, assign=True)
    del state  # the model holds the tensors now; the huge-page move below frees each original as it goes
    model.tie_weights()
    model = model.to(device)
    if model.device.type == "cpu":  # GGUF blocks too: the head's decode 1.10-1.14x faster than from the mapping
        place_on_huge_pages(model, after_copy=release, skip=placed)
    model.set_backend(backend)
    return model.eval().requires_grad_(False)


def hf_state_dict(model: Gemma3Model) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names (build_model's inverse): q|k|v and gate|up split again, the
    tied head left out. Tensors are contiguous views or copies of the parameters, in their dtype."""
    c = model.config
    if model.lm_head.scales is not None:
        raise ValueError("an int8-quantized model has no Hugging Face form: save it before quantizing")
    if model.gguf_blocks:
        raise ValueError("a model on GGUF block weights has no Hugging Face form: load the GGUF with dtype float32 "
                         "(or convert it: python -m gemma3_fast.convert)")
    d, hq, hk = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    out = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.final_norm}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.qkv_proj.weight.split((hq * d, hk * d, hk * d))
        gate, up = block.gate_up_proj.weight.chunk(2)
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": block.o_proj.weight,
                    p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                    p + "mlp.down_proj.weight": block.down_proj.weight})
        for suffix, ours in _BLOCK_NORMS.items():
            out[p + suffix] = getattr(block, ours)
    return {name: t.detach().contiguous() for name, t in out.items()}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                       "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
                       "I64": torch.int64, "BOOL": torch.bool}
_READ_CHUNK = 16 << 20


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a .safetensors file: {name: {dtype, shape, data_offsets}} and where the data starts."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 0 < n <= 100 << 20:
                raise ValueError("no valid header length")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + n


def open_safetensors_folder(folder: Path):
    """(names, get_tensor) over model.safetensors or a sharded checkpoint with its index.

    get_tensor(name, dtype=None) reads one tensor with plain file reads, in chunks converted to `dtype` as they
    come: nothing stays mapped, so the process never holds more of the file than the tensor being read (the
    mmap that safetensors' reader keeps counted every page read so far in the RSS until the end of loading)."""
    single, index_file = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{index_file}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise WeightsError(f"{index_file}: shard {f.name} is listed but missing")
    else:
        raise WeightsError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    owner = {}
    for f in files:
        header, data_start = _safetensors_header(f)
        size = f.stat().st_size
        for name, info in header.items():
            try:
                dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise WeightsError(f"{f}: tensor {name!r} has an unreadable entry in the header: {info}") from None
            nbytes = (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits
                      if dtype != torch.bool else 8) // 8 * int(torch.Size(shape).numel())
            if end - begin != nbytes or data_start + end > size:
                raise WeightsError(f"{f}: tensor {name!r} ({info['dtype']} {list(shape)}) needs bytes "
                                   f"[{data_start + begin}, {data_start + begin + nbytes}) but the file has {size} "
                                   "bytes: truncated or corrupt")
            owner[name] = (f, dtype, shape, data_start + begin)

    def get_tensor(name: str, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   rows: tuple[int, int] | None = None) -> torch.Tensor:
        """out: where to put it (its shape, of dtype), e.g. memory on huge pages, so that it is not copied again.
        rows=(a, b): only rows [a, b) of a 2-D tensor (the int8 loader quantizes the embedding as it reads it)."""
        f, stored, shape, offset = owner[name]
        if rows is not None:
            a, b = rows
            if len(shape) != 2 or not 0 <= a <= b <= shape[0]:
                raise WeightsError(f"{f}: rows [{a}, {b}) of tensor {name!r} {list(shape)} do not exist")
            offset += a * shape[1] * stored.itemsize
            shape = (b - a, shape[1])
        if dtype is None or not stored.is_floating_point:  # non-float tensors stay as they are (and are refused)
            dtype = stored
        if out is None or out.shape != shape or out.dtype != dtype:
            out = torch.empty(shape, dtype=dtype)
        flat = out.view(-1)
        n = flat.numel()
        step = max(1, _READ_CHUNK // max(1, flat.element_size()))
        buf = torch.empty(min(n, step), dtype=stored) if dtype != stored else None
        with f.open("rb") as fh:
            fh.seek(offset)
            for a in range(0, n, step):
                dest = flat[a:a + step] if buf is None else buf[:min(step, n - a)]
                view = dest.view(torch.uint8).numpy()
                if fh.readinto(view) != view.nbytes:
                    raise WeightsError(f"{f}: tensor {name!r} could not be read (the file ended early)")
                if buf is not None:
                    flat[a:a + step].copy_(dest)
        return out

    get_tensor.reads_into = True
    get_tensor.shape_of = lambda name: owner[name][2]  # reading by rows: the whole tensor's shape
    return list(owner), get_tensor
