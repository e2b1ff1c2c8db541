"""Checkpoints written atomically: a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that
`generate --model DIR` and transformers' Gemma3ForCausalLM.from_pretrained(DIR) load, and the training state
that --resume continues from.

Every file is written under a temporary name, flushed to disk, then renamed over the old one: a kill during a
save leaves the previous file whole. The training state is one file (weights, optimizer, data position, RNG),
so it can never pair the weights of one step with the optimizer of another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .model import Gemma3Model
from .tokenizer import GemmaTokenizer
from .weights import hf_state_dict

STATE_FILE = "train_state.pt"
_TOKENIZER_CONFIG = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                     "add_bos_token": True, "add_eos_token": False}


class CheckpointError(ValueError):
    """A training state that cannot be resumed from: the message names the file and what is wrong."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temporary file beside path; it is fsynced and renamed onto path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would make it (some writers create files 0600)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_hf_folder(model: Gemma3Model, tokenizer: GemmaTokenizer, folder: Path, metadata: dict | None = None) -> None:
    """config.json, model.safetensors (the weights in their dtype, under Hugging Face names) and tokenizer.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf_dict()
    config["torch_dtype"] = str(model.dtype).replace("torch.", "")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    atomic_write(folder / "model.safetensors", lambda p: save_file(hf_state_dict(model), str(p), metadata=meta))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    atomic_write(folder / "tokenizer.json", lambda p: p.write_text(tokenizer.tk.to_str()))
    atomic_write(folder / "tokenizer_config.json", lambda p: p.write_text(json.dumps(_TOKENIZER_CONFIG, indent=2)))


def save_train_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda p: torch.save(state, p))


def load_train_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume: {path} not found: there is no training state to resume from in "
                              f"{path.parent} (start a run with --out {path.parent} first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or overwritten file: pickle, zip and EOF errors of many kinds
        raise CheckpointError(f"--resume: {path} is not a readable training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"--resume: {path} is not a gemma3_fast training state (not a dict)")
    missing = [k for k in ("step", "position", "model", "optimizer", "args", "config", "rng", "tokenizer")
               if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a gemma3_fast training state (missing {missing})")
    return state
