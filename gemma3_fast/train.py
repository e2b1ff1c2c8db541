"""`python -m gemma3_fast.train`: train Gemma 3 from scratch or from a checkpoint, on the fused ops.

    python -m gemma3_fast.train --data stories.txt --out runs/tiny --config tiny --tokenizer train:4096

The training forward is the model's own block composition (reference_ops.decoder_block) on the extension's
autograd-capable ops; the output head and the loss run in chunks of rows (loss.py). AdamW (betas 0.9/0.95,
decoupled weight decay on the projection matrices only), linear warmup then cosine decay to --min-lr, one
scheduler step per optimizer step, global-norm clipping, gradient accumulation. --dtype bfloat16 runs the
activations in bf16 from fp32 master weights (no loss scaling needed: bf16 has fp32's range).

Fine-tuning: a .jsonl of {"messages": [...]} chat examples is rendered with generate --chat's template and
only the assistant turns count in the loss (sft.py); examples are packed into rows of --seq-len tokens, each
attending only to itself. --patience stops when the validation loss stops improving.

Distributed: under `torchrun --nproc_per_node N [--nnodes M ...] -m gemma3_fast.train ...` every process takes
its share of each global batch (N x --batch-size x --grad-accum rows), DistributedDataParallel averages the
gradients (gloo), and rank 0 alone writes checkpoints and logs. Each step's loss is normalized by the number of
counted tokens in the whole global batch, so N processes compute the step one process would.

The output folder is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) that
`python -m gemma3_fast.generate --model DIR` and transformers load; best/ holds the weights of the lowest
validation loss; train_state.pt is what --resume continues from; log.jsonl has one line per optimizer step;
loss.png plots it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ops as ops_module
from .checkpoint import STATE_FILE, CheckpointError, load_train_state, save_hf_folder, save_train_state
from .config import ConfigError, Gemma3Config
from .data import DataError, Windows, source_files, tokenize_to_memmap, train_tokenizer
from .loss import IGNORE_INDEX
from .model import Gemma3Model
from .sft import PackedExamples, is_chat_data, read_examples
from .tokenizer import GemmaTokenizer
from .weights import WeightsError

# Model shapes by name. tiny trains in minutes on 2 cores; small is the 270M's body (the shape of the circulating
# from-scratch scripts) with the vocabulary of the tokenizer; 270m is Gemma 3 270M itself (262144 tokens).
# tiny and small take their vocabulary size from the tokenizer, rounded up to a multiple of 64.
PRESETS = {
    "tiny": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=1, head_dim=48, query_pre_attn_scalar=48, sliding_window=128,
                 max_position_embeddings=2048),
    "small": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                  max_position_embeddings=32768),
    "270m": {},
}
# What --resume may change; everything else comes from the saved run.
RESUME_OVERRIDES = ("max_steps", "eval_every", "stop_after", "quiet", "backend", "patience")


class TrainError(ValueError):
    """A training run that cannot start: bad flags, files or combinations, said in the user's terms."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gemma3_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a .txt file, a folder of .txt/.jsonl files, or a .jsonl file with a 'text' field "
                                  "or chat examples ('messages': only the assistant turns are trained on)")
    p.add_argument("--val-data", help="validation data, same forms (default: the last 5%% of --data's tokens)")
    p.add_argument("--out", required=True, help="output folder: the checkpoint, best/, log.jsonl, loss.png")
    p.add_argument("--config", help="tiny | small | 270m | PATH/config.json (default tiny; not with --init)")
    p.add_argument("--init", help="start from a checkpoint instead of random weights: a Hugging Face folder, a "
                                  ".gguf file, or 'default' (the embedded Gemma 3 270M)")
    p.add_argument("--tokenizer", help="default (Gemma 3's) | PATH/tokenizer.json | train:VOCAB (a byte-level BPE "
                                       "trained on --data). Default: --init's tokenizer, else Gemma 3's")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=None, help="the cosine's floor (default lr / 10); < --lr")
    p.add_argument("--warmup-steps", type=int, default=100, help="optimizer steps of linear warmup")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (default 1000)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="validate and save every N optimizer steps (default 100)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation micro-batches per evaluation")
    p.add_argument("--patience", type=int, default=None,
                   help="stop when N evaluations in a row do not improve the validation loss (0 = never)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decoupled weight decay (projections)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global gradient norm limit (0 = off)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="activations' dtype; weights and optimizer state stay fp32")
    p.add_argument("--seed", type=int, default=1337, help="weights' initialization and the data order")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last state (its flags are the saved ones, except "
                        "--max-steps, --eval-every, --stop-after)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (saving the state) after N optimizer steps of this invocation; --resume continues")
    p.add_argument("--backend", default="auto", choices=["auto", "extension", "reference"],
                   help="extension = fused C++ ops and backward kernels, reference = PyTorch autograd")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(a: argparse.Namespace) -> None:
    a.max_steps = 1000 if a.max_steps is None else a.max_steps
    a.eval_every = 100 if a.eval_every is None else a.eval_every
    if a.min_lr is None:
        a.min_lr = a.lr / 10
    a.patience = a.patience or 0
    if a.patience < 0:
        raise TrainError(f"--patience must be >= 0 (0 = off), got {a.patience}")
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches"):
        if getattr(a, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if not a.lr > 0:
        raise TrainError(f"--lr must be > 0, got {a.lr}")
    if not 0 <= a.min_lr < a.lr:
        raise TrainError(f"--min-lr must be >= 0 and below --lr ({a.lr}), got {a.min_lr}: the cosine decays from "
                         "--lr down to --min-lr")
    if a.warmup_steps < 0 or a.weight_decay < 0 or a.grad_clip < 0:
        raise TrainError("--warmup-steps, --weight-decay and --grad-clip must be >= 0")
    if a.stop_after is not None and a.stop_after < 1:
        raise TrainError(f"--stop-after must be >= 1, got {a.stop_after}")
    if a.config is not None and a.init is not None:
        raise TrainError("--config and --init are exclusive: a model from --init keeps its own config")
    if a.data is None:
        raise TrainError("--data is required (a .txt file, a folder, or a .jsonl file with a 'text' field)")


def lr_at(step: int, a) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine from lr to min_lr."""
    if step < a.warmup_steps:
        return a.lr * (step + 1) / a.warmup_steps
    progress = min(1.0, (step - a.warmup_steps) / max(1, a.max_steps - a.warmup_steps))
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1.0 + math.cos(math.pi * progress))


# -- setting a run up ------------------------------------------------------------------------------------
def resolve_tokenizer(spec: str | None, init_tokenizer: GemmaTokenizer | None, files, out: Path, quiet: bool,
                      trained: bool = False):
    """trained: a train:VOCAB tokenizer is already in out/ (torchrun's rank 0 made it): load it."""
    if spec is None:
        return init_tokenizer if init_tokenizer is not None else resolve_tokenizer("default", None, files, out, quiet)
    if spec == "default":
        from .gguf_import import GGUFFile
        from .loading import default_gguf_path, gguf_tokenizer

        return gguf_tokenizer(GGUFFile(default_gguf_path(quiet=quiet)))
    if spec.startswith("train:"):
        if trained:
            return GemmaTokenizer.from_file(out / "tokenizer.json")
        try:
            vocab = int(spec[len("train:"):])
        except ValueError:
            raise TrainError(f"--tokenizer {spec}: expected train:VOCAB with an integer VOCAB, e.g. "
                             "train:4096") from None
        return train_tokenizer(files, vocab, out / "tokenizer.json", quiet)
    path = Path(spec)
    return GemmaTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path)


def resolve_config(spec: str, tokenizer: GemmaTokenizer) -> Gemma3Config:
    if spec in PRESETS:
        kw = dict(PRESETS[spec])
        if spec != "270m":
            kw["vocab_size"] = -(-tokenizer.vocab_size // 64) * 64
        config = Gemma3Config(**kw)
    else:
        path = Path(spec)
        config = Gemma3Config.from_json_file(path / "config.json" if path.is_dir() else path)
    config.torch_dtype = "float32"
    return config


def init_weights(model: Gemma3Model, seed: int) -> None:
    """N(0, 0.02) matrices and embedding, zero norm weights (Gemma's norms scale by 1 + w)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.zero_()


@dataclass
class Run:
    model: Gemma3Model
    tokenizer: GemmaTokenizer
    train: Windows | PackedExamples
    val: Windows | PackedExamples


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # gloo: training runs on the CPU (nccl would be the choice for GPU tensors).
                dist.init_process_group("gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def set_up(a, out: Path, state: dict | None = None, main: bool = True) -> Run:
    """The run's model, tokenizer and data. With a saved state (--resume): the model's shape and the tokenizer
    the run started with; the caller loads the weights. main=False (torchrun's other ranks, after rank 0's
    set_up): reuse the tokenizer rank 0 trained."""
    files = source_files(a.data)
    init_model = init_tok = None
    if a.init is not None and state is None:
        from .loading import load_model_and_tokenizer

        init_model, init_tok = load_model_and_tokenizer(None if a.init == "default" else a.init, "float32", "cpu",
                                                        a.backend, quiet=a.quiet)
    if state is not None:
        from tokenizers import Tokenizer

        tokenizer = GemmaTokenizer(Tokenizer.from_str(state["tokenizer"]), source=str(out / STATE_FILE))
    else:
        tokenizer = resolve_tokenizer(a.tokenizer, init_tok, files, out, a.quiet, trained=not main)
    if state is not None:
        model = Gemma3Model(Gemma3Config.from_hf_dict(state["config"], source=str(out / STATE_FILE)), a.backend)
    elif init_model is not None:
        model = init_model.requires_grad_(True).train()
    else:
        config = resolve_config(a.config or "tiny", tokenizer)
        model = Gemma3Model(config, backend=a.backend)
        init_weights(model, a.seed)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise TrainError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {config.vocab_size}: the model cannot embed them (choose a model or tokenizer that "
                         "match)")
    if a.seq_len > config.max_position_embeddings:
        raise TrainError(f"--seq-len {a.seq_len} exceeds the model's context of {config.max_position_embeddings} "
                         "tokens (max_position_embeddings)")
    if is_chat_data(files) or (a.val_data is not None and is_chat_data(source_files(a.val_data))):
        return set_up_examples(a, files, model, tokenizer)
    (out / "tokens").mkdir(exist_ok=True)
    tokens = tokenize_to_memmap(files, tokenizer, out / "tokens" / "train.bin", a.quiet)
    if a.val_data is not None:
        val_tokens = tokenize_to_memmap(source_files(a.val_data), tokenizer, out / "tokens" / "val.bin", a.quiet)
    else:  # hold out the tail: at least two windows, at most 5% (the training part must keep one window)
        n_val = max(len(tokens) // 20, 2 * a.seq_len + 1)
        if len(tokens) - n_val < a.seq_len + 1:
            raise DataError(f"{a.data}: {len(tokens)} tokens are too few to hold out validation windows of "
                            f"{a.seq_len + 1} tokens and still train; give --val-data or more data, or a smaller "
                            "--seq-len")
        tokens, val_tokens = tokens[:-n_val], tokens[-n_val:]
    bos = tokenizer.bos_id
    return Run(model, tokenizer, Windows(tokens, a.seq_len, a.seed, str(a.data), bos),
               Windows(val_tokens, a.seq_len, a.seed, str(a.val_data or a.data) + " (validation)", bos))


def set_up_examples(a, files, model: Gemma3Model, tokenizer: GemmaTokenizer) -> Run:
    """Fine-tuning data: chat (and text) examples, packed. Validation: --val-data, else the last 5% of the
    examples (at least one)."""
    examples = read_examples(files, tokenizer, a.seq_len, a.quiet, str(a.data))
    if a.val_data is not None:
        val = read_examples(source_files(a.val_data), tokenizer, a.seq_len, a.quiet, str(a.val_data))
    else:
        if len(examples) < 2:
            raise DataError(f"{a.data}: one example cannot be split into training and validation; give --val-data "
                            "or more examples")
        n_val = max(1, len(examples) // 20)
        examples, val = examples[:-n_val], examples[-n_val:]
    return Run(model, tokenizer, PackedExamples(examples, a.seq_len, a.seed, str(a.data)),
               PackedExamples(val, a.seq_len, a.seed, str(a.val_data or a.data) + " (validation)"))


def make_optimizer(model: Gemma3Model, a) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied head is the embedding: listed once
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": a.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one pass over each parameter's four tensors; foreach kept parameter-sized temporaries (~1 GB for the
    # 270M) and took longer.
    return torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"--out {out}: cannot write there ({e.strerror or e})") from None


# -- the loop --------------------------------------------------------------------------------------------
def unpack(batch) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """(ids, targets, seq_lens): Windows batches have no segments, PackedExamples batches do."""
    return batch if len(batch) == 3 else (*batch, None)


def counted(targets: torch.Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def loss_sums(model: Gemma3Model, batches, ops=None, dtype=None) -> tuple[float, int]:
    """(summed loss, counted tokens) over batches of Windows or PackedExamples."""
    total, n = 0.0, 0
    for batch in batches:
        x, y, seq_lens = unpack(batch)
        k = counted(y)
        if k:
            total += float(model.loss(x, y, ops, dtype, seq_lens, normalizer=1.0))
            n += k
    return total, n


def evaluate(model: Gemma3Model, val, a, ops, dtype, dist: Dist) -> float:
    """Mean loss per counted token over the first --eval-batches validation micro-batches (split between the
    processes, summed over all of them)."""
    mine = (b for i, b in enumerate(val.in_order(a.batch_size, a.eval_batches)) if i % dist.world == dist.rank)
    total, n = dist.sum(*loss_sums(model, mine, ops, dtype))
    return total / max(n, 1)


def plot_losses(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], label="train", lw=1)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats, log scale)")
    ax.set_yscale("log")
    ax.set_title(f"{png.parent.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name("." + png.name + ".partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)


class _StepLoss(torch.nn.Module):
    """model.loss as a module's forward, for DistributedDataParallel to wrap (it syncs what forward runs)."""

    def __init__(self, model: Gemma3Model):
        super().__init__()
        self.model = model

    def forward(self, x, y, ops, dtype, seq_lens, normalizer):
        return self.model.loss(x, y, ops, dtype, seq_lens, normalizer)


def train(a: argparse.Namespace) -> dict:
    from tqdm import tqdm

    dist = Dist()
    try:
        return _train(a, dist, tqdm)
    finally:
        dist.close()


def _train(a: argparse.Namespace, dist: Dist, tqdm) -> dict:
    out = Path(a.out)
    state = None
    if a.resume:
        state = load_train_state(out / STATE_FILE)
        saved = dict(state["args"])
        for key in RESUME_OVERRIDES:
            if getattr(a, key, None) is not None:
                saved[key] = getattr(a, key)
        saved["stop_after"] = a.stop_after  # for this invocation only
        a = argparse.Namespace(**{"patience": 0, **saved, "resume": True, "out": str(out)})
    check_args(a)
    quiet = a.quiet or not dist.main
    a_local = argparse.Namespace(**{**vars(a), "quiet": quiet})
    if dist.main:
        check_out_dir(out)
        run = set_up(a_local, out, state)  # tokenizer training and tokenizing happen here, once
        dist.barrier()
    else:
        dist.barrier()
        run = set_up(a_local, out, state, main=False)
    model, dtype = run.model, torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    ops = ops_module.training_ops(a.backend, "cpu")
    opt = make_optimizer(model, a)
    step, position, best, tokens_seen, stale = 0, 0, float("inf"), 0, 0
    log_path = out / "log.jsonl"
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, position, best = state["step"], state["position"], state["best_val"]
        tokens_seen, stale = state.get("tokens", 0), state.get("stale_evals", 0)
        torch.set_rng_state(state["rng"])
        if dist.main:
            kept = [line for line in (log_path.read_text().splitlines() if log_path.is_file() else [])
                    if line.strip() and json.loads(line)["step"] <= step]
            log_path.write_text("".join(line + "\n" for line in kept))
    elif dist.main:
        log_path.write_text("")
        (out / "run.json").write_text(json.dumps(vars(a), indent=2))
    step_loss = _StepLoss(model)
    if dist.world > 1:  # the gradients are averaged over the processes during backward, in buckets
        step_loss = torch.nn.parallel.DistributedDataParallel(step_loss, broadcast_buffers=False)

    params = [p for group in opt.param_groups for p in group["params"]]
    rows_per_step = dist.world * a.batch_size * a.grad_accum
    stop_at = a.max_steps if a.stop_after is None else min(a.max_steps, step + a.stop_after)
    if not quiet:
        n_params = sum(p.numel() for p in params)
        data = (f"{run.train.tokens if isinstance(run.train, PackedExamples) else len(run.train.tokens):,} training "
                f"tokens ({run.train.count:,} " + ("packed rows" if isinstance(run.train, PackedExamples) else
                                                   "windows") + f" of {a.seq_len})")
        procs = f", {dist.world} processes" if dist.world > 1 else ""
        print(f"gemma3_fast.train: {n_params / 1e6:.1f}M parameters, {data}, {rows_per_step:,} rows per step, "
              f"{ops.name} ops, {a.dtype}, {torch.get_num_threads()} threads{procs}", file=sys.stderr)

    def save(val_loss: float | None) -> None:
        if not dist.main:
            return
        meta = {"step": step, "tokens": tokens_seen}
        save_hf_folder(model, run.tokenizer, out, meta)
        if val_loss is not None and val_loss < best:
            save_hf_folder(model, run.tokenizer, out / "best", {**meta, "val_loss": val_loss})
        save_train_state(out / STATE_FILE, {
            "step": step, "position": position, "model": model.state_dict(), "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(), "best_val": min(best, val_loss if val_loss is not None else best),
            "tokens": tokens_seen, "stale_evals": stale, "args": vars(a), "config": model.config.to_hf_dict(),
            "tokenizer": run.tokenizer.tk.to_str()})

    bar = tqdm(total=a.max_steps, initial=step, disable=quiet, desc="training", unit="step", dynamic_ncols=True)
    last, stopped_early = {}, False
    with open(log_path, "a") if dist.main else contextlib.nullcontext() as log:
        while step < stop_at:
            t0 = time.perf_counter()
            lr = lr_at(step, a)
            for group in opt.param_groups:
                group["lr"] = lr
            # This process's micro-batches: micro-batch m of the global step is rows [m*N*B, (m+1)*N*B) of it,
            # of which process r takes [(m*N + r)*B, (m*N + r + 1)*B).
            batches = [unpack(run.train.batch(position + (m * dist.world + dist.rank) * a.batch_size, a.batch_size))
                       for m in range(a.grad_accum)]
            position += rows_per_step
            n_counted, n_tokens = dist.sum(sum(counted(y) for _, y, _ in batches),
                                           sum(x.numel() for x, _, _ in batches))
            # Each process's share of sum(loss) / (counted tokens of the global step); DDP averages the
            # gradients over the N processes, hence the factor N.
            normalizer = max(n_counted, 1) / dist.world
            loss_sum = 0.0
            for m, (x, y, seq_lens) in enumerate(batches):
                sync = m == len(batches) - 1 or dist.world == 1
                with contextlib.nullcontext() if sync else step_loss.no_sync():
                    loss = step_loss(x, y, ops, dtype, seq_lens, normalizer)
                    loss.backward()
                loss_sum += loss.detach().item()
            (loss_sum,) = dist.sum(loss_sum / dist.world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += int(n_tokens)
            dt = time.perf_counter() - t0
            last = {"step": step, "loss": loss_sum, "lr": lr, "tokens": tokens_seen, "grad_norm": float(grad_norm),
                    "tokens_per_s": n_tokens / dt}
            if not math.isfinite(last["loss"]):
                raise TrainError(f"step {step}: the loss is {last['loss']} (diverged); lower --lr or raise "
                                 "--warmup-steps")
            val_loss = None
            if step % a.eval_every == 0 or step == a.max_steps:
                val_loss = last["val_loss"] = evaluate(model, run.val, a, ops, dtype, dist)
                stale = 0 if val_loss < best else stale + 1
                stopped_early = a.patience > 0 and stale >= a.patience
            if dist.main:
                log.write(json.dumps(last) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            bar.update(1)
            if val_loss is not None or step == stop_at or stopped_early:
                save(val_loss)
                best = min(best, val_loss) if val_loss is not None else best
            if stopped_early:
                break
    bar.close()
    if dist.main and log_path.stat().st_size:
        plot_losses(log_path, out / "loss.png")
    if not quiet:
        if stopped_early:
            done = (f"stopped early at step {step}: the validation loss did not improve in {a.patience} "
                    "evaluations (--patience)")
        elif step >= a.max_steps:
            done = "done"
        else:
            done = f"stopped at step {step} of {a.max_steps} (continue with --resume)"
        print(f"gemma3_fast.train: {done}; checkpoint {out}, best validation loss {best:.4f} in {out / 'best'}",
              file=sys.stderr)
    return {**last, "stopped_early": stopped_early}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        train(args)
    except (TrainError, DataError, CheckpointError, ConfigError, WeightsError, FileNotFoundError) as e:
        print(f"gemma3_fast.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
