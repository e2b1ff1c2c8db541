"""Model configuration: a dataclass with Gemma 3 270M defaults, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SLIDING = "sliding_attention"
FULL = "full_attention"

# Keys that define the tensor shapes: a config.json without them cannot describe a checkpoint.
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


class ConfigError(ValueError):
    """A config.json that does not describe a Gemma 3 text model we can run."""


@dataclass
class Gemma3Config:
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta_global: float = 1_000_000.0
    rope_theta_local: float = 10_000.0
    sliding_window: int = 512
    query_pre_attn_scalar: float = 256.0
    max_position_embeddings: int = 32768
    layer_types: list[str] = field(default_factory=list)
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0
    tie_word_embeddings: bool = True
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not self.layer_types:
            # Gemma 3's published pattern: every 6th layer is global.
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
        if bad:
            raise ConfigError(f"layer_types holds unknown attention types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1, got {self.sliding_window}")

    # -- derived values -------------------------------------------------------------------
    @property
    def attn_scale(self) -> float:
        # Gemma 3 scales by query_pre_attn_scalar**-0.5, not head_dim**-0.5 (equal for 270M only by chance).
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def embed_scale(self) -> float:
        return float(self.hidden_size) ** 0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def rope_theta(self, layer: int) -> float:
        return self.rope_theta_local if self.is_sliding(layer) else self.rope_theta_global

    # -- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "Gemma3Config":
        if "text_config" in cfg and isinstance(cfg["text_config"], dict):  # multimodal wrapper
            cfg = {**cfg["text_config"]}
        missing = [k for k in _REQUIRED_HF_KEYS if k not in cfg]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {missing}")
        kw: dict = {k: cfg[k] for k in _REQUIRED_HF_KEYS}
        for key in ("rms_norm_eps", "sliding_window", "query_pre_attn_scalar", "max_position_embeddings",
                    "layer_types", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        if dtype is not None:
            kw["torch_dtype"] = str(dtype).replace("torch.", "")

        # Two RoPE spellings exist: the published one (rope_theta = global base, rope_local_base_freq = local)
        # and the newer rope_parameters = {full_attention: {rope_theta}, sliding_attention: {rope_theta}}.
        rp = cfg.get("rope_parameters")
        if isinstance(rp, dict) and FULL in rp:
            kw["rope_theta_global"] = float(rp[FULL]["rope_theta"])
            if SLIDING in rp:
                kw["rope_theta_local"] = float(rp[SLIDING]["rope_theta"])
            scaling = rp[FULL].get("rope_type", "default")
        else:
            if cfg.get("rope_theta") is not None:
                kw["rope_theta_global"] = float(cfg["rope_theta"])
            if cfg.get("rope_local_base_freq") is not None:
                kw["rope_theta_local"] = float(cfg["rope_local_base_freq"])
            rs = cfg.get("rope_scaling")
            scaling = rs.get("rope_type", rs.get("type", "default")) if isinstance(rs, dict) else "default"
        if scaling not in ("default", None):
            raise ConfigError(f"{source}: RoPE scaling {scaling!r} is not supported (only plain RoPE, as in 270M/1B)")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise ConfigError(f"{source}: {key}={cfg[key]} is set; Gemma 3 has no softcapping and neither do we")
        act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ConfigError(f"{source}: hidden_activation {act!r} is not gelu_pytorch_tanh")
        if "layer_types" not in kw and cfg.get("sliding_window_pattern"):
            p = int(cfg["sliding_window_pattern"])
            kw["layer_types"] = [FULL if (i + 1) % p == 0 else SLIDING for i in range(kw["num_hidden_layers"])]
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Gemma3Config":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(data, source=str(path))

    def to_hf_dict(self) -> dict:
        """The published config.json form, as google/gemma-3-270m ships it."""
        return {
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta_global,
            "rope_local_base_freq": self.rope_theta_local,
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": _int_if_whole(self.query_pre_attn_scalar),
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": list(self.layer_types),
            "hidden_activation": "gelu_pytorch_tanh",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
            "rope_scaling": None,
            "torch_dtype": self.torch_dtype,
        }


def _int_if_whole(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x
