"""config.json forms, the loader's sources, and the errors a user sees for bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gemma3_fast.config import ConfigError, Gemma3Config
from gemma3_fast.loading import load_model_and_tokenizer
from gemma3_fast.weights import WeightsError, resolve_dtype
from tests.conftest import tiny_config, tiny_hf_tensors, write_hf_folder

PUBLISHED_270M = {  # google/gemma-3-270m config.json (abridged to what matters, plus keys we ignore)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 262144,
    "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "sliding_window": 512, "query_pre_attn_scalar": 256,
    "max_position_embeddings": 32768, "torch_dtype": "bfloat16", "use_bidirectional_attention": False,
    "layer_types": ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]
    + ["sliding_attention"] * 5 + ["full_attention"],
    "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "some_future_key": {"ignored": True},
}


def test_published_config_form():
    c = Gemma3Config.from_hf_dict(PUBLISHED_270M)
    assert (c.rope_theta_global, c.rope_theta_local) == (1e6, 1e4)
    assert [i for i in range(18) if not c.is_sliding(i)] == [5, 11, 17]
    assert c.attn_scale == 1 / 16 and c.torch_dtype == "bfloat16"
    assert c == Gemma3Config()  # the defaults are the 270M values


def test_rope_parameters_config_form():
    cfg = {k: v for k, v in PUBLISHED_270M.items() if k not in ("rope_theta", "rope_local_base_freq", "torch_dtype")}
    cfg["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0}}
    cfg["dtype"] = "float32"
    c = Gemma3Config.from_hf_dict(cfg)
    assert (c.rope_theta_global, c.rope_theta_local, c.torch_dtype) == (5e5, 2e4, "float32")


def test_layer_types_default_to_every_sixth_global():
    cfg = {k: v for k, v in PUBLISHED_270M.items() if k != "layer_types"}
    assert Gemma3Config.from_hf_dict(cfg).layer_types == PUBLISHED_270M["layer_types"]


def test_config_errors_name_the_key():
    cfg = {k: v for k, v in PUBLISHED_270M.items() if k not in ("head_dim", "hidden_size")}
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['hidden_size', 'head_dim'\]"):
        Gemma3Config.from_hf_dict(cfg)
    with pytest.raises(ConfigError, match="layer_types has 3 entries but num_hidden_layers is 18"):
        Gemma3Config.from_hf_dict({**PUBLISHED_270M, "layer_types": ["full_attention"] * 3})
    with pytest.raises(ConfigError, match="softcapping"):
        Gemma3Config.from_hf_dict({**PUBLISHED_270M, "final_logit_softcapping": 30.0})
    with pytest.raises(ConfigError, match="RoPE scaling 'linear'"):
        Gemma3Config.from_hf_dict({**PUBLISHED_270M, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})


def test_dtype_choices():
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported: Gemma 3 activations overflow fp16"):
        resolve_dtype("float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("int8")


def test_sharded_checkpoint_loads_like_single_file(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_folder / f, folder / f)
    a, _ = load_model_and_tokenizer(tiny_folder, "float32", "cpu", "reference")
    b, _ = load_model_and_tokenizer(folder, "float32", "cpu", "reference")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bad_weight_files(tiny_folder, tmp_path):
    config = tiny_config()
    bad = tiny_hf_tensors(config)
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"][:, :-1]
    folder = write_hf_folder(tmp_path / "shape", config, bad)
    with pytest.raises(WeightsError, match=r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \(96, 63\), "
                                           r"but config.json implies \(96, 64\)"):
        load_model_and_tokenizer(folder, "float32", "cpu")

    missing = tiny_hf_tensors(config)
    del missing["model.layers.2.self_attn.k_norm.weight"]
    folder = write_hf_folder(tmp_path / "missing", config, missing)
    with pytest.raises(WeightsError, match=r"missing tensor\(s\) \['model.layers.2.self_attn.k_norm.weight'\]"):
        load_model_and_tokenizer(folder, "float32", "cpu")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_folder, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="model.safetensors: not a readable safetensors file"):
        load_model_and_tokenizer(corrupt, "float32", "cpu")

    (corrupt / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json"):
        load_model_and_tokenizer(corrupt, "float32", "cpu")

    noconfig = tmp_path / "noconfig"
    shutil.copytree(tiny_folder, noconfig)
    (noconfig / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        load_model_and_tokenizer(noconfig, "float32", "cpu")

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "nowhere", "float32", "cpu")

    fake_gguf = tmp_path / "broken.gguf"
    fake_gguf.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(WeightsError, match="broken.gguf: truncated GGUF header"):
        load_model_and_tokenizer(fake_gguf, "float32", "cpu")


def test_cuda_device_without_gpu_is_refused(tiny_folder):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no CUDA GPU is available"):
        load_model_and_tokenizer(tiny_folder, "float32", "cuda")


def test_safetensors_read_tensor_by_tensor_and_truncation_named(tmp_path):
    folder = write_hf_folder(tmp_path / "m", tiny_config(), tiny_hf_tensors(tiny_config()))
    from gemma3_fast.weights import open_safetensors_folder

    names, get_tensor = open_safetensors_folder(folder)
    name = "model.layers.0.mlp.down_proj.weight"
    full = get_tensor(name)
    assert full.dtype == torch.float32 and torch.equal(get_tensor(name, torch.bfloat16), full.bfloat16())
    # by rows (the int8 loader reads the embedding so): rows [a, b) of the tensor, any range; others refused
    assert get_tensor.shape_of(name) == tuple(full.shape)
    for a, b in ((0, 1), (3, 17), (0, full.shape[0]), (full.shape[0], full.shape[0])):
        assert torch.equal(get_tensor(name, torch.bfloat16, rows=(a, b)), full[a:b].bfloat16())
    for rows in ((-1, 2), (5, 3), (0, full.shape[0] + 1)):
        with pytest.raises(WeightsError, match=r"rows \[.*\) of tensor 'model.layers.0.mlp.down_proj.weight'"):
            get_tensor(name, rows=rows)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(WeightsError, match=r"model.safetensors: tensor '.*' \(F32 \[.*\]\) needs bytes .* truncated"):
        load_model_and_tokenizer(folder, "float32", "cpu")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_load_quantizes_as_read_with_the_values_of_a_whole_quantization(tiny_folder, dtype):
    """--quantize int8 quantizes the embedding as it reads it (by rows) and each fused projection part by part:
    the same int8 values and scales as quantize_int8 of the whole full-precision tensors, and the int8 head is the
    lookups' table."""
    from gemma3_fast.quantize import quantize_int8

    full = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "reference")[0]
    q = load_model_and_tokenizer(tiny_folder, dtype, "cpu", "reference", quantize="int8")[0]
    assert q.embed_tokens.weight is q.lm_head.weight and q.dtype == getattr(torch, dtype)
    pairs = [(q.lm_head, full.embed_tokens.weight)] + [
        (getattr(qb, n), getattr(fb, n).weight) for qb, fb in zip(q.layers, full.layers)
        for n in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
    for linear, weight in pairs:
        want_q, want_s = quantize_int8(weight)
        assert torch.equal(linear.weight, want_q) and torch.equal(linear.scales, want_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_int8_in_chunks_leaves_its_input_alone(dtype):
    """quantize_int8 works a chunk of rows at a time, dividing a copy in place: the input is untouched (fp32 too,
    past the first chunk), and the result is the one-shot formula's."""
    from gemma3_fast.quantize import quant_rows, quantize_int8

    w = (torch.randn(2 * quant_rows(48) + 7, 48, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    w0 = w.clone()
    q, s = quantize_int8(w)
    assert torch.equal(w, w0)
    wf = w.float()
    want_s = wf.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    assert torch.equal(s, want_s)
    assert torch.equal(q, torch.round(wf / want_s[:, None]).clamp(-127, 127).to(torch.int8))
