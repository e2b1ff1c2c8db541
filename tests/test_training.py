"""Training end to end: the training forward against the inference forward, extension vs reference gradients,
`python -m gemma3_fast.train` (overfitting, determinism, resume, checkpoints that generate and transformers
load, atomic saves) and its errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config, tiny_hf_tensors, write_hf_folder
from gemma3_fast import ops
from gemma3_fast.loading import load_model_and_tokenizer
from gemma3_fast.stories import write_corpus
from gemma3_fast.train import main as train_main

pytestmark = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")

# A small run of the tiny preset on a byte-level BPE of 300 tokens: each step takes a few ms.
FAST = ["--config", "tiny", "--tokenizer", "train:300", "--seq-len", "32", "--batch-size", "4", "--lr", "3e-3",
        "--warmup-steps", "5", "--eval-batches", "2", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("data") / "stories.txt", 60, seed=1)


def trainable_tiny_model(tmp_path):
    model, _ = load_model_and_tokenizer(write_hf_folder(tmp_path / "m", tiny_config(), tiny_hf_tensors(tiny_config())),
                                        device="cpu")
    return model.requires_grad_(True).train()


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# -- the training forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_training_forward_logits_equal_decoder_forward(tmp_path, backend):
    """Batched, no cache, T > the sliding window (8), each row from position 0 == decoder_forward per row."""
    model = trainable_tiny_model(tmp_path)
    ids = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(0))
    y = model.hidden_states(ids, ops.training_ops(backend, "cpu"))
    logits = F.linear(y, model.lm_head.weight)
    with torch.no_grad():
        for b in range(3):
            want = model(ids[b], torch.arange(21), None, all_logits=True)
            torch.testing.assert_close(logits[b], want, rtol=1e-4, atol=1e-4)


def test_extension_gradients_equal_reference_autograd(tmp_path):
    model = trainable_tiny_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 300, (2, 19), generator=g), torch.randint(0, 300, (2, 19), generator=g)
    targets[0, :3] = -100  # ignored positions
    got = {}
    for backend in ("extension", "reference"):
        model.zero_grad()
        loss = model.loss(ids, targets, ops.training_ops(backend, "cpu"))
        loss.backward()
        got[backend] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(got["extension"][0], got["reference"][0], rtol=1e-5, atol=1e-5)
    want_loss = F.cross_entropy(F.linear(model.hidden_states(ids), model.lm_head.weight).flatten(0, 1),
                                targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(got["extension"][0], want_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, grad in got["extension"][1].items():
        want = got["reference"][1][name]
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-4 * want.abs().max().item() + 1e-7, msg=name)


def test_bf16_training_step_tracks_fp32(tmp_path):
    """bf16 activations from fp32 master weights: gradients land in fp32 and point where fp32's do."""
    model = trainable_tiny_model(tmp_path)
    g = torch.Generator().manual_seed(2)
    ids, targets = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        model.loss(ids, targets, compute_dtype=dtype).backward()
        grads[dtype] = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    cos = F.cosine_similarity(grads[torch.float32], grads[torch.bfloat16], dim=0)
    assert cos > 0.99, cos


# -- the CLI ---------------------------------------------------------------------------------------------
def test_tiny_model_overfits_small_text_deterministically(tmp_path, corpus):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert train_main(["--data", str(corpus), "--out", str(out), "--max-steps", "150", "--eval-every", "50",
                           *FAST]) == 0
        runs.append(read_log(out))
    a, b = runs
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # same seed, same data order, same numbers
    late = sum(r["loss"] for r in a[-10:]) / 10
    assert a[0]["loss"] > 5.0 and late < 2.0, (a[0]["loss"], late)  # ln(300) = 5.7 at the start
    assert a[-1]["val_loss"] < 2.2
    assert [r["step"] for r in a] == list(range(1, 151)) and a[-1]["tokens"] == 150 * 4 * 32
    assert "val_loss" in a[49] and "val_loss" not in a[50]
    lrs = [r["lr"] for r in a]  # warmup to the peak at step 5, then the cosine down towards --min-lr
    assert lrs[4] == pytest.approx(3e-3) and lrs[-1] < lrs[60] < lrs[5] and lrs[-1] >= 3e-4
    assert (tmp_path / "a" / "loss.png").stat().st_size > 10_000


def test_resume_continues_exactly(tmp_path, corpus):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ["--data", str(corpus), "--max-steps", "16", "--eval-every", "4", "--grad-accum", "2", *FAST]
    assert train_main(["--out", str(whole), *common]) == 0
    assert train_main(["--out", str(part), "--stop-after", "6", *common]) == 0  # stopped between evaluations
    assert len(read_log(part)) == 6
    assert train_main(["--out", str(part), "--resume", "--quiet"]) == 0
    got, want = read_log(part), read_log(whole)
    assert [r["step"] for r in got] == list(range(1, 17))
    for g, w in zip(got, want):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6), g["step"]
        assert g.get("val_loss", 0) == pytest.approx(w.get("val_loss", 0), abs=1e-6)


def test_resume_after_sigkill(tmp_path, corpus):
    """A run killed with SIGKILL (no chance to save) resumes from its last checkpoint and ends with the losses of
    an uninterrupted run: the steps after the checkpoint are redone, their log lines replaced."""
    import os
    import signal
    import subprocess
    import sys
    import time

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ["--data", str(corpus), "--max-steps", "40", "--eval-every", "3", *FAST]
    assert train_main(["--out", str(whole), *common]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "gemma3_fast.train", "--out", str(killed), *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "train_state.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere after the first checkpoint, maybe inside a later save
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(read_log(killed)) < 40
    assert train_main(["--out", str(killed), "--resume", "--quiet"]) == 0
    got, want = read_log(killed), read_log(whole)
    assert [r["step"] for r in got] == list(range(1, 41))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], abs=1e-6)


def test_checkpoint_loads_in_generate_and_transformers(tmp_path, corpus, capsys):
    from transformers import Gemma3ForCausalLM

    from gemma3_fast.generate import main as generate_main

    out = tmp_path / "run"
    assert train_main(["--data", str(corpus), "--out", str(out), "--max-steps", "20", "--eval-every", "10",
                       *FAST]) == 0
    for folder in (out, out / "best"):
        ours, tok = load_model_and_tokenizer(folder, device="cpu")
        theirs = Gemma3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        ids = torch.tensor(tok.encode("Once upon a time, there was a child named Lily."))
        with torch.no_grad():
            want = theirs(ids[None]).logits[0]
            got = ours(ids, torch.arange(len(ids)), None, all_logits=True)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    # The seed scripts' spellings of the flags.
    assert generate_main(["--model_path", str(out), "--prompt", "Once upon a time", "--max_tokens", "8",
                          "--top_k", "5", "--temperature", "0.8", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("Once upon a time")


def test_windows_start_with_bos_and_cover_the_stream():
    import numpy as np

    from gemma3_fast.data import Windows

    stream = np.array([2, 10, 11, 12, 13, 14, 15, 1, 2, 16, 17, 1], dtype=np.uint16)  # <bos> ... <eos>, twice
    w = Windows(stream, 4, seed=0, bos_id=2)
    assert w.count == 2
    assert w.window(0).tolist() == [2, 10, 11, 12, 13]  # a document's start: as it is
    assert w.window(1).tolist() == [2, 13, 14, 15, 1]  # cut inside a document: <bos> prepended
    x, y = w.batch(0, 2)
    assert (x[:, 0] == 2).all() and x.shape == y.shape == (2, 4)
    # Targets cover the stream after each cut: 10..13 from the first window, 13..<eos> from the second.
    assert sorted(y.flatten().tolist()) == sorted([10, 11, 12, 13, 13, 14, 15, 1])


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save killed half-way (here: an exception while the new file is written) leaves the old file whole."""
    import gemma3_fast.checkpoint as ckpt

    target = tmp_path / "train_state.pt"
    ckpt.save_train_state(target, {"step": 1})

    def dies(path):
        Path(path).write_bytes(b"half a file")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_write(target, dies)
    assert torch.load(target)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_state.pt"]  # no partial file left behind


def test_jsonl_text_and_folder_data_and_val_data(tmp_path, corpus):
    stories = corpus.read_text().split("\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(stories[:30]))
    (folder / "b.jsonl").write_text("\n".join(json.dumps({"text": s}) for s in stories[30:55]) + "\n")
    val = tmp_path / "val.jsonl"
    val.write_text("\n".join(json.dumps({"text": s}) for s in stories[55:]))
    out = tmp_path / "out"
    assert train_main(["--data", str(folder), "--val-data", str(val), "--out", str(out), "--max-steps", "3",
                       "--eval-every", "3", *FAST]) == 0
    meta = json.loads((out / "tokens" / "train.json").read_text())
    assert meta["documents"] == 1 + 25 and len(meta["sources"]) == 2
    assert json.loads((out / "tokens" / "val.json").read_text())["documents"] == 5
    # A second run reuses the token files (same sources, same tokenizer): they are not rewritten.
    before = (out / "tokens" / "train.bin").stat().st_mtime_ns
    assert train_main(["--data", str(folder), "--val-data", str(val), "--out", str(out), "--max-steps", "1",
                       "--eval-every", "1", "--tokenizer", str(out / "tokenizer.json"),
                       *[f for f in FAST if not f.startswith("train:") and f != "--tokenizer"]]) == 0
    assert (out / "tokens" / "train.bin").stat().st_mtime_ns == before


def test_config_file_and_init_from_checkpoint(tmp_path, corpus):
    config = tiny_config(vocab_size=320)
    folder = write_hf_folder(tmp_path / "tiny", config, tiny_hf_tensors(config))
    out = tmp_path / "scratch"
    assert train_main(["--data", str(corpus), "--out", str(out), "--config", str(folder / "config.json"),
                       "--max-steps", "2", "--eval-every", "2",
                       *[f for f in FAST if f not in ("--config", "tiny")]]) == 0
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    # --init: starts from the checkpoint's weights (its tokenizer: the test folder's word-level one).
    out2 = tmp_path / "finetuned"
    assert train_main(["--data", str(corpus), "--out", str(out2), "--init", str(out), "--max-steps", "2",
                       "--eval-every", "2", "--seq-len", "16", "--batch-size", "2", "--quiet"]) == 0
    first = read_log(out2)[0]["loss"]
    assert first < read_log(out)[0]["loss"]  # trained weights, not random ones


# -- bad input -------------------------------------------------------------------------------------------
def run_error(capsys, argv) -> str:
    code = train_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,message", [
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--lr", "1e-3", "--min-lr", "1e-3"], "--min-lr must be >= 0 and below --lr"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's context of 2048"),
    (["--tokenizer", "train:100"], "needs a vocabulary of at least 262"),
])
def test_bad_flags(tmp_path, corpus, capsys, extra, message):
    err = run_error(capsys, ["--data", str(corpus), "--out", str(tmp_path / "o"), *FAST, *extra])
    assert message in err


def test_bad_data(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert "no such file or folder" in run_error(capsys, ["--data", str(tmp_path / "nope.txt"), "--out", out, *FAST])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "no text to train on" in run_error(capsys, ["--data", str(empty), "--out", out, *FAST])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    assert f"{bad}:2: expected an object with a string 'text' field" in run_error(
        capsys, ["--data", str(bad), "--out", out, *FAST])


def test_tokenizer_larger_than_the_model(tmp_path, corpus, capsys):
    folder = write_hf_folder(tmp_path / "tiny", tiny_config(), tiny_hf_tensors(tiny_config()))  # vocab 300
    err = run_error(capsys, ["--data", str(corpus), "--out", str(tmp_path / "o"), "--config",
                             str(folder / "config.json"), "--tokenizer", "train:400", "--quiet"])
    assert "has 400 tokens but the model's vocab_size is 300" in err


def test_resume_errors_and_unwritable_out(tmp_path, corpus, capsys):
    out = tmp_path / "o"
    err = run_error(capsys, ["--data", str(corpus), "--out", str(out), "--resume", "--quiet"])
    assert "train_state.pt not found" in err
    out.mkdir()
    (out / "train_state.pt").write_bytes(b"not a checkpoint")
    assert "is not a readable training state" in run_error(capsys, ["--out", str(out), "--resume", "--quiet"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "cannot write there" in run_error(capsys, ["--data", str(corpus), "--out", str(blocker / "sub"), *FAST])


@pytest.mark.slow
def test_init_default_starts_from_the_real_270m(tmp_path, corpus, default_folder):
    """--init default: the embedded Gemma 3 270M and its tokenizer; English stories are far from random to it."""
    out = tmp_path / "ft"
    assert train_main(["--data", str(corpus), "--out", str(out), "--init", "default", "--max-steps", "2",
                       "--eval-every", "2", "--seq-len", "32", "--batch-size", "1", "--eval-batches", "1",
                       "--lr", "1e-5", "--warmup-steps", "0", "--quiet"]) == 0
    log = read_log(out)
    assert log[0]["loss"] < 4.0, log  # a random 262144-token model starts at ln(262144) = 12.5
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 262144 and config["num_hidden_layers"] == 18
