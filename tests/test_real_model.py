"""The real Gemma 3 270M (default model) against Hugging Face transformers, the oracle, in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gemma3_fast import ops
from gemma3_fast.generation import Gemma3LM
from gemma3_fast.loading import load_model_and_tokenizer
from gemma3_fast.sampling import SamplingParams

BACKENDS = ["reference"] + (["extension"] if ops.EXTENSION_AVAILABLE else [])
TEXT = (Path(__file__).parent.parent / "bench" / "data" / "printing_press.txt").read_text()
SHORT_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
                 "Translate to German: The weather is nice today.\nGerman:"]


@pytest.fixture(scope="module")
def hf_model(default_folder):
    from transformers import Gemma3ForCausalLM

    return Gemma3ForCausalLM.from_pretrained(default_folder, torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()


# "native": the GGUF itself on the block kernels (the default run); the others load the fp32 folder converted from it.
@pytest.fixture(scope="module", params=BACKENDS + (["native"] if ops.EXTENSION_AVAILABLE else []))
def lm(request, default_folder, default_gguf) -> Gemma3LM:
    if request.param == "native":
        model, tok = load_model_and_tokenizer(default_gguf, "auto", "cpu", "extension")
        assert model.gguf_blocks
        return Gemma3LM(model, tok)
    return Gemma3LM(*load_model_and_tokenizer(default_folder, "float32", "cpu", request.param))


def test_oracle_is_transformers_reading_the_gguf(hf_model, default_gguf):
    """The oracle (transformers on the converted folder) is transformers reading the GGUF itself: same weights."""
    from transformers import Gemma3ForCausalLM

    direct = Gemma3ForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                               torch_dtype=torch.float32)
    a, b = direct.state_dict(), hf_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def ids_of(lm: Gemma3LM, text: str, n_tokens: int | None = None) -> list[int]:
    ids = lm.tokenizer.encode(text)
    return ids if n_tokens is None else ids[:n_tokens]


def hf_last_logits(hf_model, ids):
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0, -1]


def hf_greedy(hf_model, ids, n):
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, top_k=None, top_p=None)
    return out[0, len(ids):].tolist()


def our_greedy(lm, ids, n):
    return list(lm.generate_ids(ids, n, SamplingParams(temperature=0.0), stop_on_eos=False))


@pytest.mark.parametrize("which", ["short0", "short1", "short2", "long"])
def test_last_logits_match_transformers(lm, hf_model, which):
    ids = ids_of(lm, TEXT, 760) if which == "long" else ids_of(lm, SHORT_PROMPTS[int(which[-1])])
    assert which != "long" or len(ids) > 700
    cache = lm.model.new_cache(len(ids))
    ours = lm.model.prefill(torch.tensor(ids), cache)[0]
    diff = (ours - hf_last_logits(hf_model, ids)).abs().max().item()
    assert diff <= 1e-3, diff


@pytest.mark.parametrize("prompt", SHORT_PROMPTS[:2])
def test_greedy_continuation_identical_to_transformers(lm, hf_model, prompt):
    ids = ids_of(lm, prompt)
    expected = hf_greedy(hf_model, ids, 40)
    assert len(expected) == 40
    assert our_greedy(lm, ids, 40) == expected


def test_decode_across_position_512_matches_transformers(lm, hf_model):
    ids = ids_of(lm, TEXT, 490)  # generation runs from position 490 through 529, across the window edge
    assert our_greedy(lm, ids, 40) == hf_greedy(hf_model, ids, 40)


def test_chunked_prefill_equals_one_shot_and_full_forward(lm):
    ids = torch.tensor(ids_of(lm, TEXT, 1100))  # > 2 windows
    model = lm.model
    one_shot = model.prefill(ids, model.new_cache(len(ids)))
    chunked = model.prefill(ids, model.new_cache(len(ids)), chunk_size=128)
    odd = model.prefill(ids, model.new_cache(len(ids)), chunk_size=511)
    with torch.inference_mode():
        full = model(ids, torch.arange(len(ids)), None)
    for got in (one_shot, chunked, odd):
        assert (got - full).abs().max().item() <= 1e-4


def test_gguf_and_safetensors_give_the_same_model(default_folder, default_gguf):
    from_folder, _ = load_model_and_tokenizer(default_folder, "float32", "cpu", BACKENDS[-1])
    from_gguf, tok = load_model_and_tokenizer(default_gguf, "float32", "cpu", BACKENDS[-1])
    a, b = from_folder.state_dict(), from_gguf.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # norms were stored as (1 + w) in the GGUF: after conversion they are small offsets around 0, not around 1
    assert from_gguf.final_norm.abs().mean() < from_gguf.final_norm.add(1).abs().mean()
    ids = torch.tensor(tok.encode(SHORT_PROMPTS[0]))
    with torch.inference_mode():
        torch.testing.assert_close(from_gguf(ids, torch.arange(len(ids))), from_folder(ids, torch.arange(len(ids))))


@pytest.mark.parametrize("kind", ["tokenizers", "compact"])
def test_gguf_tokenizer_matches_transformers(default_gguf, kind):
    """Ours, on `tokenizers` and on the extension's BpeTokenizer (what loading uses), against transformers'
    own reading of the GGUF's vocabulary."""
    from transformers import AutoTokenizer

    from gemma3_fast.gguf_import import GGUFFile
    from gemma3_fast.loading import gguf_tokenizer
    from gemma3_fast.tokenizer import GemmaTokenizer

    if kind == "compact":
        if not ops.EXTENSION_AVAILABLE:
            pytest.skip("BpeTokenizer is part of the compiled extension")
        ours = gguf_tokenizer(GGUFFile(default_gguf))
        assert ours.compact is not None
    else:
        ours = GemmaTokenizer(GGUFFile(default_gguf).tokenizer())
    theirs = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    texts = SHORT_PROMPTS + [TEXT[:2000], "  two leading spaces\n\n\ttab, emoji 🤖, 日本語", "<start_of_turn>user\nhi"]
    for text in texts:
        assert ours.encode(text) == theirs(text).input_ids
        assert ours.decode(ours.encode(text)[1:], skip_special_tokens=False) == text  # lossless, spaces kept


@pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
def test_extension_and_reference_agree_on_real_weights(default_folder):
    ref = Gemma3LM(*load_model_and_tokenizer(default_folder, "float32", "cpu", "reference"))
    ext = Gemma3LM(*load_model_and_tokenizer(default_folder, "float32", "cpu", "extension"))
    ids = ids_of(ref, SHORT_PROMPTS[0])
    assert our_greedy(ext, ids, 48) == our_greedy(ref, ids, 48)
    r = load_model_and_tokenizer(default_folder, "bfloat16", "cpu", "reference")[0]
    e = load_model_and_tokenizer(default_folder, "bfloat16", "cpu", "extension")[0]
    long_ids = torch.tensor(ids_of(ref, TEXT, 700))
    lr = r.prefill(long_ids, r.new_cache(700), 128).float()
    le = e.prefill(long_ids, e.new_cache(700), 128).float()
    l32 = ref.model.prefill(long_ids, ref.model.new_cache(700)).float()
    # the extension's bf16 error vs fp32 is of the same size as the reference's own bf16 error
    assert (le - l32).abs().max() <= 2 * (lr - l32).abs().max() + 0.05
    assert le.argmax() in l32.topk(5).indices  # near-ties may swap in bf16, but not far
