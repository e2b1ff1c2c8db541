"""Training step speed and memory: gemma3_fast's fused ops vs the same model on the reference ops (PyTorch
autograd) vs transformers' Gemma3ForCausalLM, same weights, dtype, threads and batch, one run.

    python bench/train.py                      # tiny (8 x 256), the 270M (4 x 256 and 4 x 512), fp32, ~25 minutes
    python bench/train.py --shapes 270m-ft --engines gemma3_fast/extension transformers/sdpa   # fine-tune rows
    python bench/train.py --shapes 270m --dtype bfloat16 --rounds 3
    python bench/train.py --json out.json      # the raw numbers elsewhere (default bench/raw/train.json)

A step is forward + backward + fused AdamW (betas 0.9/0.95, weight decay 0.1) on random token ids, one micro-batch;
tokens/s = batch x seq_len / median step time over --steps steps after one warm-up step. Every row runs in
its own process, so its peak RSS (getrusage ru_maxrss: model, gradients, optimizer state, activations, the
interpreter and its libraries) is its own. The rows run --rounds times in turn (the host's memory bandwidth
drifts over minutes) and the table shows the median over rounds. transformers runs its default attention
(sdpa) and its loss as ForCausalLMLoss computes it: F.cross_entropy on the whole logits, upcast to fp32.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from report import cpu_description, render_train, write_raw

SHAPES = {  # name: (preset, vocab for tiny, batch, seq_len, steps)
    "tiny": ("tiny", 4096, 8, 256, 10),
    "270m": ("270m", None, 4, 256, 3),
    "270m-ft": ("270m", None, 4, 512, 3),  # the fine-tuning issue's shape: full fine-tune at 4 x 512
}
ENGINES = [("gemma3_fast", "extension"), ("gemma3_fast", "reference"), ("transformers", "sdpa")]


def make_model(shape: str):
    from gemma3_fast.config import Gemma3Config
    from gemma3_fast.model import Gemma3Model
    from gemma3_fast.train import PRESETS, init_weights

    preset, vocab, *_ = SHAPES[shape]
    kw = dict(PRESETS[preset])
    if vocab:
        kw["vocab_size"] = vocab
    model = Gemma3Model(Gemma3Config(**kw))
    init_weights(model, 0)
    return model


def child(spec: dict) -> dict:
    engine, backend, shape, dtype_name = spec["engine"], spec["backend"], spec["shape"], spec["dtype"]
    _, _, batch, seq_len, steps = SHAPES[shape]
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    model = make_model(shape)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g) for _ in range(steps + 1)]
    if engine == "gemma3_fast":
        from gemma3_fast import ops

        model.set_backend(backend)
        train_ops = ops.training_ops(backend, "cpu")
        params = list(model.parameters())

        def loss_of(x, y):
            return model.loss(x, y, train_ops, dtype)
    else:
        import torch.nn.functional as F
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        from gemma3_fast.weights import hf_state_dict

        config = Gemma3TextConfig(**{k: v for k, v in model.config.to_hf_dict().items()
                                     if k not in ("architectures", "model_type")})
        hf = Gemma3ForCausalLM(config).float()
        missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
        assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
        del model
        hf.tie_weights()
        hf.train()
        params = list(hf.parameters())

        def loss_of(x, y):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                logits = hf(input_ids=x).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)  # as train.py
    times, losses = [], []
    for i, rows in enumerate(data):
        t0 = time.perf_counter()
        loss = loss_of(rows[:, :-1], rows[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step is a warm-up (allocations, oneDNN's kernel choice)
            times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    step = statistics.median(times)
    return {"step_s": step, "tokens_per_s": batch * seq_len / step, "first_loss": losses[0],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engines", nargs="+", default=[f"{e}/{b}" for e, b in ENGINES],
                   choices=[f"{e}/{b}" for e, b in ENGINES], help="which rows to run (default: all)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "raw" / "train.json"),
                   help="the raw numbers (default bench/raw/train.json; `python bench/report.py` makes the table)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return

    specs = [dict(engine=e, backend=b, shape=s, dtype=a.dtype) for s in a.shapes for e, b in ENGINES
             if f"{e}/{b}" in a.engines]
    results: dict[int, list[dict]] = {i: [] for i in range(len(specs))}
    for r in range(a.rounds):
        for i, spec in enumerate(specs):
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                  text=True)
            if proc.returncode:
                print(f"{spec}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            results[i].append(out)
            print(f"round {r + 1}: {spec['shape']} {spec['engine']}/{spec['backend']}: "
                  f"{out['tokens_per_s']:.0f} tok/s, {out['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)

    table = []
    for shape in a.shapes:
        _, _, batch, seq_len, _ = SHAPES[shape]
        for i, spec in enumerate(specs):
            if spec["shape"] == shape and results[i]:
                table.append({"shape": shape, "batch": batch, "seq_len": seq_len, "engine": spec["engine"],
                              "ops": spec["backend"], **{k: statistics.median(r[k] for r in results[i])
                                                        for k in ("step_s", "tokens_per_s", "peak_rss_mib")}})
    data = {"kind": "train", "machine": cpu_description(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": a.dtype, "rounds": a.rounds, "rows": table,
            "raw": {str(i): results[i] for i in results}}
    print("\n" + render_train(data), end="")
    write_raw(Path(a.json), data)


if __name__ == "__main__":
    main()
