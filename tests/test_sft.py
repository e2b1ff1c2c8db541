"""Fine-tuning: chat rendering and its loss mask, packing that keeps examples apart, the loss over counted tokens,
SFT end to end on a tiny model (it learns its data to 100%), --patience, `python -m gemma3_fast.evaluate`,
torchrun with 2 processes against one process, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config, tiny_hf_tensors, write_hf_folder
from tests.test_training import run_error
from gemma3_fast import extraction_task, ops, sft
from gemma3_fast.data import DataError, train_tokenizer
from gemma3_fast.evaluate import evaluate, field_scores
from gemma3_fast.evaluate import main as evaluate_main
from gemma3_fast.generation import load
from gemma3_fast.loading import load_model_and_tokenizer
from gemma3_fast.loss import IGNORE_INDEX
from gemma3_fast.tokenizer import GemmaTokenizer
from gemma3_fast.train import main as train_main

pytestmark = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="compiled extension not built")
ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict:
    """A small extraction dataset, and a byte-level BPE trained on it (the tiny model's tokenizer)."""
    d = tmp_path_factory.mktemp("task")
    train_rows, val_rows, _ = extraction_task.make_splits(16, 4)
    train = write_jsonl(d / "train.jsonl", train_rows)
    val = write_jsonl(d / "val.jsonl", val_rows)
    train_tokenizer([train], 512, d / "tokenizer.json", quiet=True)
    return {"train": train, "val": val, "tokenizer": d / "tokenizer.json", "dir": d}


def chat(user: str, answer: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


# -- rendering and the loss mask -------------------------------------------------------------------------
def check_mask(tok: GemmaTokenizer, messages: list[dict]) -> None:
    ids, counted = sft.render(tok, messages)
    # The ids are the chat template's, encoded whole: what `generate --chat` feeds the model (one <bos>).
    assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert ids.count(tok.bos_id) == 1
    # Token by token: the counted tokens are each assistant turn's content and its <end_of_turn>, nothing else.
    expected = []
    pos = 0
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    for m in messages:
        if m["role"] == "assistant":
            start = text.index("<start_of_turn>model\n", pos) + len("<start_of_turn>model\n")
            expected.append(m["content"].strip() + "<end_of_turn>")
            pos = start
    runs, cur = [], []
    for i, c in zip(ids, counted):
        if c:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == expected
    assert all(tok.end_of_turn_id == r[-1] for r in runs)
    # Targets are the next token where it is counted.
    ex = sft.make_example(ids, counted)
    assert ex.length == len(ids) - 1
    for t in range(ex.length):
        assert ex.targets[t] == (ids[t + 1] if counted[t + 1] else IGNORE_INDEX)


def test_loss_mask_counts_only_assistant_turns(task):
    tok = GemmaTokenizer.from_file(task["tokenizer"])
    check_mask(tok, chat("Sentence: Maria Lopez, 34, works as a nurse in Denver.",
                         '{"name": "Maria Lopez", "age": 34, "city": "Denver", "job": "nurse"}',
                         system="Be brief.")["messages"])
    check_mask(tok, [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "first"},
                     {"role": "user", "content": "again"}, {"role": "assistant", "content": " second one "}])


@pytest.mark.slow
def test_loss_mask_with_gemma_tokenizer(default_folder):
    tok = GemmaTokenizer.from_file(default_folder / "tokenizer.json")
    check_mask(tok, extraction_task.make_splits(1, 1)[0][0]["messages"])
    check_mask(tok, [{"role": "system", "content": "You extract."}, {"role": "user", "content": "Ünïcode: 東京 🚀"},
                     {"role": "assistant", "content": "{\"city\": \"東京\"}"}])


def test_packing_fills_rows_and_keeps_every_example():
    lengths = [5, 9, 3, 16, 7, 1, 12, 4, 8]
    bins = sft.pack(lengths, 16)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 16 for b in bins)
    assert len(bins) == -(-sum(lengths) // 16)  # here best fit reaches the lower bound


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_packed_example_logits_equal_its_logits_alone(tmp_path, backend):
    """Three examples end to end in one row (longer than the sliding window of 8 and not): each example's hidden
    states equal the ones it gets alone, so no token attends across examples and positions restart."""
    model, _ = load_model_and_tokenizer(write_hf_folder(tmp_path / "m", tiny_config(), tiny_hf_tensors(tiny_config())),
                                        device="cpu", backend=backend)
    g = torch.Generator().manual_seed(0)
    lens = [5, 13, 20]
    seqs = [torch.randint(0, 300, (1, n), generator=g) for n in lens]
    with torch.no_grad():
        packed = model.hidden_states(torch.cat(seqs, 1), seq_lens=lens)
        for s, part in zip(seqs, packed.split(lens, 1)):
            torch.testing.assert_close(part, model.hidden_states(s), atol=2e-5, rtol=1e-5)
        # Without seq_lens the same row is one sequence: the later examples' states change.
        assert not torch.allclose(model.hidden_states(torch.cat(seqs, 1)).split(lens, 1)[2], packed.split(lens, 1)[2],
                                  atol=1e-3)


def test_loss_counts_only_targets_and_takes_a_normalizer(tmp_path):
    model, _ = load_model_and_tokenizer(write_hf_folder(tmp_path / "m", tiny_config(), tiny_hf_tensors(tiny_config())),
                                        device="cpu")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (1, 30), generator=g)
    targets = torch.randint(0, 300, (1, 30), generator=g)
    targets[0, :12] = IGNORE_INDEX
    targets[0, 20:23] = IGNORE_INDEX
    lens = [10, 20]
    with torch.no_grad():
        h = model.hidden_states(ids, seq_lens=lens)
        logits = F.linear(h.flatten(0, 1), model.lm_head.weight)
        want = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        torch.testing.assert_close(model.loss(ids, targets, seq_lens=lens, normalizer=1.0), want, rtol=1e-5, atol=1e-4)
        n = int((targets != IGNORE_INDEX).sum())
        torch.testing.assert_close(model.loss(ids, targets, seq_lens=lens), want / n, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="seq_lens"):
        model.loss(ids, targets, seq_lens=[10, 10])


# -- fine-tuning end to end ----------------------------------------------------------------------------------
def sft_args(task, out, *extra) -> list[str]:
    return ["--data", str(task["train"]), "--val-data", str(task["val"]), "--out", str(out), "--config", "tiny",
            "--tokenizer", str(task["tokenizer"]), "--seq-len", "256", "--batch-size", "2", "--lr", "3e-3",
            "--min-lr", "1e-4", "--warmup-steps", "10", "--eval-batches", "4", "--quiet", *extra]


def test_sft_learns_its_data_to_100_percent(tmp_path, task):
    out = tmp_path / "run"
    assert train_main(sft_args(task, out, "--max-steps", "200", "--eval-every", "100")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.05 * log[0]["loss"]
    lm = load(str(out), dtype="float32")
    res = evaluate(lm, task["train"], max_new_tokens=40, quiet=True)
    assert res["exact_match"] == 1.0, [r for r in res["results"] if not r["exact"]][:2]
    assert res["field_accuracy"] == 1.0
    assert res["val_loss"] < 0.05


def test_patience_stops_when_validation_stops_improving(tmp_path, task, monkeypatch):
    import gemma3_fast.train as train_module

    losses = iter([3.0, 2.0, 2.5, 2.4, 2.2, 1.0])
    monkeypatch.setattr(train_module, "evaluate", lambda *args, **kw: next(losses))
    out = tmp_path / "run"
    assert train_main(sft_args(task, out, "--max-steps", "50", "--eval-every", "2", "--patience", "3")) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in log if "val_loss" in r] == [3.0, 2.0, 2.5, 2.4, 2.2]
    assert log[-1]["step"] == 10  # three evaluations after the best (step 4) without improving
    from safetensors import safe_open

    with safe_open(str(out / "best" / "model.safetensors"), "pt") as f:  # best/ holds the step-4 weights
        assert f.metadata()["step"] == "4" and f.metadata()["val_loss"] == "2.0"
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 10 and state["best_val"] == 2.0


def test_evaluate_cli(tmp_path, task, capsys):
    folder = write_hf_folder(tmp_path / "m", tiny_config(vocab_size=512), tiny_hf_tensors(tiny_config(vocab_size=512)))
    (folder / "tokenizer.json").write_bytes(task["tokenizer"].read_bytes())
    out_json = tmp_path / "res.json"
    assert evaluate_main(["--model", str(folder), "--data", str(task["val"]), "--limit", "2", "--max-new-tokens", "4",
                          "--json", str(out_json), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "exact match: 0.000 (0/2)" in printed and "JSON field accuracy: 0.000" in printed
    assert json.loads(out_json.read_text())["examples"] == 2
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "x"},
                                                             {"role": "user", "content": "y"}]}])
    assert evaluate_main(["--model", str(folder), "--data", str(bad), "--quiet"]) == 2
    assert "the last message must be the assistant's answer" in capsys.readouterr().err


def test_field_scores():
    ref = '{"name": "A B", "age": 3, "city": "C", "job": "d"}'
    assert field_scores(ref, ref) == (4, 4)
    assert field_scores('{"name": "A B", "age": "3", "city": "C"}', ref) == (2, 4)
    assert field_scores("not json", ref) == (0, 4)
    assert field_scores("x", "plain answer") is None


# -- torchrun ----------------------------------------------------------------------------------------------
def test_torchrun_two_processes_equal_one(tmp_path, task):
    """2 processes (gloo) x batch 1 == 1 process x batch 2: the same global batches, the same losses."""
    common = ["--max-steps", "20", "--eval-every", "10", "--lr", "1e-3", "--seed", "3"]
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = sft_args(task, one, *common)
    args[args.index("--batch-size") + 1] = "2"
    single = subprocess.run([sys.executable, "-m", "gemma3_fast.train", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    args = sft_args(task, two, *common)
    args[args.index("--batch-size") + 1] = "1"
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(port), "-m", "gemma3_fast.train", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = [json.loads(line) for line in (one / "log.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 20
    print(f"max |dloss| over {len(a)} steps: {max(abs(ra['loss'] - rb['loss']) for ra, rb in zip(a, b)):.2e}")
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 1e-4, (ra, rb)
        assert ra["tokens"] == rb["tokens"]
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= 1e-4
    # --resume with one process continues the two-process run.
    assert train_main(["--out", str(two), "--resume", "--max-steps", "22", "--quiet"]) == 0
    c = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in c] == list(range(1, 23))


# -- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
     "message 1 has role 'robot'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "message 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "message 0 must be an object with string 'role' and 'content'"),
])
def test_bad_chat_examples(tmp_path, task, capsys, row, message):
    rows = extraction_task.make_splits(3, 1)[0] + [row]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    err = run_error(capsys, ["--data", str(data), "--out", str(tmp_path / "o"), "--config", "tiny", "--tokenizer",
                             str(task["tokenizer"]), "--quiet"])
    assert f"{data}:4: {message}" in err


def test_long_examples_are_truncated_with_a_count(task):
    tok = GemmaTokenizer.from_file(task["tokenizer"])
    rows = extraction_task.make_splits(5, 1)[0]
    path = write_jsonl(task["dir"] / "long.jsonl", rows)
    lengths = [len(sft.render(tok, r["messages"])[0]) for r in rows]
    seq_len = sorted(lengths)[2]  # the two longest do not fit
    import io
    from contextlib import redirect_stderr

    buf = io.StringIO()
    with redirect_stderr(buf):
        examples = sft.read_examples([path], tok, seq_len - 1)
    n_long = sum(n > seq_len for n in lengths)
    assert n_long >= 1
    assert f"warning: {n_long} of 5 examples" in buf.getvalue() and "were truncated" in buf.getvalue()
    assert max(e.length for e in examples) <= seq_len - 1


def test_model_vocabulary_must_cover_the_tokenizer(tmp_path, task, capsys):
    folder = write_hf_folder(tmp_path / "tiny", tiny_config(), tiny_hf_tensors(tiny_config()))  # vocab 300
    err = run_error(capsys, ["--data", str(task["train"]), "--out", str(tmp_path / "o"), "--init", str(folder),
                             "--tokenizer", str(task["tokenizer"]), "--quiet"])
    assert "has 512 tokens but the model's vocab_size is 300" in err


def test_chat_data_errors_from_read_examples(tmp_path, task):
    tok = GemmaTokenizer.from_file(task["tokenizer"])
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        sft.read_examples([bad], tok, 64)


def test_extraction_task_holds_out_names_and_cities(tmp_path):
    assert extraction_task.main(["--out", str(tmp_path), "--train", "300", "--val", "50"]) == 0
    splits = {}
    for name in ("train", "val", "test"):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        splits[name] = [json.loads(r["messages"][-1]["content"]) for r in rows]
        for r, answer in zip(rows, splits[name]):
            sentence = r["messages"][0]["content"]
            assert all(str(answer[k]) in sentence for k in ("name", "age", "city", "job"))
    assert [len(v) for v in splits.values()] == [300, 50, 50]
    seen = {a[k] for a in splits["train"] for k in ("name", "city")}
    assert not seen & {a[k] for s in ("val", "test") for a in splits[s] for k in ("name", "city")}
    assert splits["val"] != splits["test"]
