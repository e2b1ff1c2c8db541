"""`python -m gemma3_fast.generate`: the default run, flags, reproducibility, and clear errors for bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gemma3_fast.generate import DEFAULT_PROMPT, main
from gemma3_fast.tokenizer import GemmaTokenizer


def run_cli(*args, stdin=None, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "gemma3_fast.generate", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=600)


def test_default_run_prints_a_continuation_and_stats(default_folder):
    r = run_cli("--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(DEFAULT_PROMPT) and len(r.stdout) > len(DEFAULT_PROMPT) + 10
    stats = r.stderr.strip().splitlines()[-1]
    for field in ("prompt", "prefill", "tok/s", "generated 12 tokens", "decode", "peak memory"):
        assert field in stats


def test_greedy_is_deterministic_and_no_stream_matches_stream(default_folder, capsys):
    outs = []
    for extra in ([], [], ["--no-stream"]):
        assert main(["--prompt", "Water boils at", "--max-new-tokens", "10", "--temperature", "0", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2]


def test_seed_reproduces_sampling(default_folder, capsys):
    args = ["--prompt", "Once upon a time", "--max-new-tokens", "16", "--temperature", "1.2", "--top-k", "64",
            "--top-p", "0.95", "--min-p", "0.01", "--repetition-penalty", "1.1", "--dtype", "bfloat16"]
    runs = []
    for seed in ("7", "7", "8"):
        assert main([*args, "--seed", seed]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # 16 tokens at temperature 1.2: a different seed all but surely differs


def test_prompt_from_stdin_and_seed_spelling(default_folder):
    r = run_cli("--prompt", "-", "--max_tokens", "4", "--backend", "reference", stdin="The sky is")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The sky is")
    assert "generated 4 tokens" in r.stderr


def test_prompt_from_stdin_that_is_not_utf8(default_folder):
    r = subprocess.run([sys.executable, "-m", "gemma3_fast.generate", "--prompt", "-", "--max-new-tokens", "2"],
                       input=b"The caf\xe9 is", capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith("The caf\ufffd is")


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--min-p", "1"], "min-p must be in [0, 1)"),
    (["--top-k", "-1"], "top-k must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--dtype", "float16"], "float16 is not supported"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--device", "tpu"], "invalid choice: 'tpu'"),
    (["--backend", "fast"], "invalid choice: 'fast'"),
])
def test_bad_flags_are_refused_before_loading(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_errors_after_parsing_are_one_clear_line(default_folder, tmp_path, capsys):
    assert main(["--max-new-tokens", "40000"]) == 1
    out = capsys.readouterr()
    assert "exceeds the model's context of 32768 tokens" in out.err
    assert out.out == ""  # the prompt is not echoed before the error
    assert main(["--model", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    assert main(["--model", str(tmp_path / "bad.gguf")]) == 1
    assert "bad.gguf: not a GGUF file (no GGUF magic)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda"]) == 1
        assert "no CUDA GPU is available" in capsys.readouterr().err


def test_missing_extension_warns_once_and_backend_extension_fails(default_folder):
    env = {"GEMMA3_FAST_DISABLE_EXTENSION": "1"}
    r = run_cli("--max-new-tokens", "2", env_extra=env)
    assert r.returncode == 0 and r.stderr.count("compiled extension is not available") == 1
    assert "[reference backend" in r.stderr
    r = run_cli("--max-new-tokens", "2", "--backend", "extension", env_extra=env)
    assert r.returncode == 1 and "--backend extension: the compiled extension gemma3_fast._C is not available" in r.stderr


# -- tokenizer: BOS, chat template, streaming ---------------------------------------------------------
@pytest.fixture(scope="module")
def tok(default_folder) -> GemmaTokenizer:
    return GemmaTokenizer.from_file(default_folder / "tokenizer.json")


def test_single_bos_and_chat_template(tok):
    assert tok.encode("Hello")[0] == tok.bos_id and tok.encode("Hello")[1] != tok.bos_id
    assert tok.encode("<bos>Hello") == tok.encode("Hello")  # a prompt that carries its own <bos> keeps one
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                    {"role": "user", "content": "Name a color."}])
    assert text == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\nName a color.<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(text)
    assert ids.count(tok.bos_id) == 1 and ids[1] == tok.tk.token_to_id("<start_of_turn>")
    assert tok.stop_ids == {1, 106}


def test_streaming_decode_keeps_spaces_and_multibyte_characters(tok):
    text = "Hello  world, this is   spaced.\n\nEmoji 🤖 and 日本語 too."
    ids = tok.encode(text, add_bos=False)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
