"""End-to-end speed: gemma3_fast (extension / reference backends, fp32 / bf16 / int8) vs transformers, same
weights (the default Gemma 3 270M), same threads, one run. Also: measured memory bandwidth and the decode
roofline per dtype, decode speed at position ~100 vs ~4000, and int8 quality against bf16.

    python bench/e2e.py                  # the README's table (about 14 minutes on 2 cores; 17 with --llama-cpp)
    python bench/e2e.py --llama-cpp      # adds llama-cpp-python on the same GGUF, if it is installed
    python bench/e2e.py --json out.json  # the raw numbers elsewhere (default bench/raw/e2e.json)

Each engine runs in its own subprocess (clean peak RSS, no state shared between rows). Decode tok/s is
1 / median step time over 128 greedy steps after a 512-token prompt (EOS ignored); prefill tok/s is the
512-token prompt in one shot, median of 3 runs (1 when a run takes over 5 s). The whole list runs --rounds
times in turn (default 3) and every number in the table is the median over the rounds. Each round also runs
a head-to-head child per dtype: this package and transformers in one process, prefills (3) then decode steps
alternating, for ratios that the host's drift between processes cannot skew, and an int8-vs-bf16 child (both
models in one process, steps alternating) for the int8 speedup.
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

from report import machine_info, render_e2e, write_raw

HERE = Path(__file__).resolve().parent
TEXT = (HERE / "data" / "printing_press.txt").read_text()
PROMPT_TOKENS, DECODE_STEPS = 512, 128

ENGINES = [  # (engine, backend, dtype, quantize); dtype "auto": the default run, the GGUF on its block kernels
    ("gemma3_fast", "extension", "auto", "none"),
    ("gemma3_fast", "extension", "float32", "none"),
    ("gemma3_fast", "extension", "bfloat16", "none"),
    ("gemma3_fast", "extension", "bfloat16", "int8"),
    ("gemma3_fast", "reference", "float32", "none"),
    ("gemma3_fast", "reference", "bfloat16", "none"),
    ("transformers", "sdpa", "float32", "none"),
    ("transformers", "sdpa", "bfloat16", "none"),
]


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(TEXT)
    while len(ids) < n:  # long-context runs: the text again, without another BOS
        ids += tokenizer.encode(TEXT, add_bos=False)
    return ids[:n]


# -- child: one engine ---------------------------------------------------------------------------------------
def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def median_prefill(run_once) -> float:
    times = []
    for _ in range(3):
        times.append(timed(run_once)[1])
        if times[-1] > 5:
            break
    return statistics.median(times)


def bench_gemma3_fast(backend, dtype, quantize, long_context):
    from gemma3_fast.loading import default_model_dir, load_model_and_tokenizer

    # "auto": the default model as the CLI runs it (its GGUF, natively); the others: its Hugging Face folder (fp32
    # safetensors, converted from the same GGUF) loaded in the row's dtype, as a user's folder loads.
    source = None if dtype == "auto" else default_model_dir()
    model, tok = load_model_and_tokenizer(source, dtype, "cpu", backend, quantize=quantize)
    ids = torch.tensor(prompt_ids(tok, PROMPT_TOKENS))

    def decode_speeds(prompts: list[torch.Tensor], steps: int, probe: BandwidthProbe | None = None) -> list[float]:
        """Greedy decode after each prompt, the sequences' steps interleaved so that all of them run under
        the same machine conditions (memory bandwidth on a shared host drifts over seconds)."""
        caches = [model.new_cache(len(p) + steps + 1) for p in prompts]
        tokens = [int(model.prefill(p, c).float().argmax()) for p, c in zip(prompts, caches)]
        sessions = [model.decode_session(c) for c in caches]  # greedy steps, as generation runs them
        times: list[list[float]] = [[] for _ in prompts]
        for _ in range(steps):
            for i, session in enumerate(sessions):
                t0 = time.perf_counter()
                tokens[i] = session.greedy(tokens[i])
                times[i].append(time.perf_counter() - t0)
            if probe is not None:
                probe.sample()
        return [1.0 / statistics.median(t[2:]) for t in times]

    decode_speeds([ids[:16]], 4)  # warm up
    prefill_s = median_prefill(lambda: model.prefill(ids, model.new_cache(PROMPT_TOKENS)))
    peak = peak_rss_mib()  # the run's own peak (load, prefill, cache), before the probe's buffer
    probe = BandwidthProbe()
    result = {"prefill_tps": PROMPT_TOKENS / prefill_s, "decode_tps": decode_speeds([ids], DECODE_STEPS, probe)[0],
              "bandwidth_gbs": probe.median(), "peak_rss_mib": peak}
    if long_context:
        near, far = decode_speeds([ids[:100], torch.tensor(prompt_ids(tok, 3968))], 64)
        result["decode_tps_pos100"], result["decode_tps_pos4000"] = near, far
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       if name.endswith("weight") and "embed_tokens" not in name)
    if model.lm_head.weight is model.embed_tokens.weight:
        weight_bytes += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    result["bytes_per_token"] = weight_bytes
    return result


def bench_transformers(dtype):
    from transformers import Gemma3ForCausalLM

    from gemma3_fast.loading import default_model_dir
    from gemma3_fast.tokenizer import GemmaTokenizer

    folder = default_model_dir()
    model = Gemma3ForCausalLM.from_pretrained(folder, torch_dtype=getattr(torch, dtype)).eval()
    tok = GemmaTokenizer.from_file(folder / "tokenizer.json")
    ids = torch.tensor([prompt_ids(tok, PROMPT_TOKENS)])

    def decode_speed(prompt, steps, probe=None):
        step = transformers_stepper(model, prompt)
        times = []
        for _ in range(steps):
            times.append(timed(step)[1])
            if probe is not None:
                probe.sample()
        return 1.0 / statistics.median(times[2:])

    with torch.inference_mode():
        decode_speed(ids[:, :16], 4)
        prefill_s = median_prefill(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))
        peak = peak_rss_mib()
        probe = BandwidthProbe()
        return {"prefill_tps": PROMPT_TOKENS / prefill_s, "decode_tps": decode_speed(ids, DECODE_STEPS, probe),
                "bandwidth_gbs": probe.median(), "peak_rss_mib": peak}


def transformers_stepper(model, prompt):
    """Prefill `prompt` [1, T] with transformers' own KV cache; returns a function doing one greedy step."""
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    # Greedy as transformers' generate() picks: an fp32 copy of the last logits, then argmax.
    state = {"past": out.past_key_values, "token": out.logits[:, -1].float().argmax(-1, keepdim=True)}

    def step():
        out = model(input_ids=state["token"], past_key_values=state["past"], use_cache=True)
        state["past"], state["token"] = out.past_key_values, out.logits[:, -1].float().argmax(-1, keepdim=True)

    return step


def bench_head_to_head(dtype):
    """This package (extension) and transformers in one process, their decode steps alternating, so both see
    the same machine conditions: the decode speed ratio without the drift between separate processes."""
    from transformers import Gemma3ForCausalLM

    from gemma3_fast.loading import default_model_dir, load_model_and_tokenizer

    ours, tok = load_model_and_tokenizer(None, dtype, "cpu", "extension")
    hf = Gemma3ForCausalLM.from_pretrained(default_model_dir(), torch_dtype=getattr(torch, dtype)).eval()
    ids = torch.tensor(prompt_ids(tok, PROMPT_TOKENS))
    with torch.inference_mode():
        # Prefill too, alternating: transformers' fp32 prefill moved by 20% between runs (499-615 tok/s).
        # For fp32 also ours with torch's opt-in switch for bf16 math in oneDNN's fp32 matmuls (see linear.cpp).
        ours_p, hf_p, ours_bf16_math_p = [], [], []
        for _ in range(3):
            ours_p.append(timed(lambda: ours.prefill(ids, ours.new_cache(PROMPT_TOKENS)))[1])
            hf_p.append(timed(lambda: hf(input_ids=ids[None], use_cache=True, logits_to_keep=1))[1])
            if dtype == "float32":
                torch.set_float32_matmul_precision("medium")  # sets the mkldnn switch too (torch >= 2.9)
                ours_bf16_math_p.append(timed(lambda: ours.prefill(ids, ours.new_cache(PROMPT_TOKENS)))[1])
                torch.set_float32_matmul_precision("highest")
        cache = ours.new_cache(PROMPT_TOKENS + DECODE_STEPS + 1)
        state = {"token": int(ours.prefill(ids, cache).float().argmax())}
        session = ours.decode_session(cache)

        def our_step():
            state["token"] = session.greedy(state["token"])

        hf_step = transformers_stepper(hf, ids[None])
        ours_t, hf_t = [], []
        for _ in range(DECODE_STEPS // 2):
            ours_t.append(timed(our_step)[1])
            hf_t.append(timed(hf_step)[1])
    return {"ours_tps": 1 / statistics.median(ours_t[2:]), "hf_tps": 1 / statistics.median(hf_t[2:]),
            "ratio": statistics.median(h / o for o, h in zip(ours_t[2:], hf_t[2:])),
            "ours_prefill_tps": PROMPT_TOKENS / statistics.median(ours_p),
            "hf_prefill_tps": PROMPT_TOKENS / statistics.median(hf_p),
            "prefill_ratio": statistics.median(h / o for o, h in zip(ours_p, hf_p)),
            **({"ours_bf16_math_prefill_tps": PROMPT_TOKENS / statistics.median(ours_bf16_math_p),
                "bf16_math_prefill_ratio": statistics.median(h / o for o, h in zip(ours_bf16_math_p, hf_p))}
               if ours_bf16_math_p else {})}


def bench_int8_vs_bf16():
    """The bf16 and the int8 model in one process, their decode steps alternating: the int8 speedup under the
    same machine conditions (rows measured minutes apart can land in different bandwidth phases)."""
    from gemma3_fast.loading import load_model_and_tokenizer

    steppers, tok = [], None
    for quant in ("none", "int8"):
        model, tok = load_model_and_tokenizer(None, "bfloat16", "cpu", "extension", quantize=quant)
        ids = torch.tensor(prompt_ids(tok, PROMPT_TOKENS))
        with torch.inference_mode():
            cache = model.new_cache(PROMPT_TOKENS + DECODE_STEPS + 1)
            state = {"token": int(model.prefill(ids, cache).float().argmax())}
        session = model.decode_session(cache)

        def step(session=session, state=state):
            state["token"] = session.greedy(state["token"])

        steppers.append(step)
    bf16_t, int8_t = [], []
    for _ in range(DECODE_STEPS // 2):
        bf16_t.append(timed(steppers[0])[1])
        int8_t.append(timed(steppers[1])[1])
    return {"bf16_tps": 1 / statistics.median(bf16_t[2:]), "int8_tps": 1 / statistics.median(int8_t[2:]),
            "ratio": statistics.median(b / i for b, i in zip(bf16_t[2:], int8_t[2:]))}


def bench_llama_cpp(threads):
    import numpy as np
    from llama_cpp import Llama

    from gemma3_fast.loading import DEFAULT_MODEL_NAME, cache_dir, default_model_dir
    from gemma3_fast.tokenizer import GemmaTokenizer

    tok = GemmaTokenizer.from_file(default_model_dir() / "tokenizer.json")
    llm = Llama(model_path=str(cache_dir() / f"{DEFAULT_MODEL_NAME}.gguf"), n_ctx=1024, n_threads=threads,
                n_batch=512, verbose=False)
    ids = prompt_ids(tok, PROMPT_TOKENS)
    llm.reset()
    llm.eval(ids[:16])
    llm.reset()
    _, prefill_s = timed(lambda: llm.eval(ids))
    peak = peak_rss_mib()
    probe = BandwidthProbe()
    def last_logits_argmax() -> int:  # greedy, like the other engines (llama.cpp keeps only the last logits)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))

    times = []
    token = last_logits_argmax()
    for _ in range(DECODE_STEPS):
        t0 = time.perf_counter()
        llm.eval([token])
        token = last_logits_argmax()
        times.append(time.perf_counter() - t0)
        probe.sample()
    return {"prefill_tps": PROMPT_TOKENS / prefill_s, "bandwidth_gbs": probe.median(),
            "decode_tps": 1.0 / statistics.median(times[2:]), "peak_rss_mib": peak}


def bench_native_vs_llama_cpp(threads):
    """The native GGUF path (exact fp32 activations, and the opt-in int16 ones) and llama.cpp on the same file in
    one process, decode steps alternating (and the 512-token prefills, three each, alternating): ratios that the
    host's bandwidth drift cannot skew. Then the int16 mode's quality: its logits against the exact ones over 128
    teacher-forced decode steps."""
    import numpy as np
    from llama_cpp import Llama

    from gemma3_fast.loading import DEFAULT_MODEL_NAME, cache_dir, load_model_and_tokenizer
    from gemma3_fast.ops import set_gguf_activations

    ours, tok = load_model_and_tokenizer(None, "auto", "cpu", "extension")
    llm = Llama(model_path=str(cache_dir() / f"{DEFAULT_MODEL_NAME}.gguf"), n_ctx=1024, n_threads=threads,
                n_batch=512, verbose=False)
    ids = prompt_ids(tok, PROMPT_TOKENS)
    ours_p, llama_p = [], []
    with torch.inference_mode():
        for _ in range(3):
            ours_p.append(timed(lambda: ours.prefill(torch.tensor(ids), ours.new_cache(PROMPT_TOKENS)))[1])
            llm.reset()
            llama_p.append(timed(lambda: llm.eval(ids))[1])
        caches = [ours.new_cache(PROMPT_TOKENS + 2 * DECODE_STEPS + 1) for _ in range(2)]
        first = [int(ours.prefill(torch.tensor(ids), c).argmax()) for c in caches]
    sessions = [ours.decode_session(c) for c in caches]
    state = {"exact": first[0], "int16": first[1]}

    def llama_argmax() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))))

    state["llama"] = llama_argmax()

    def llama_step():
        llm.eval([state["llama"]])
        state["llama"] = llama_argmax()

    def our_step(mode, session, key):
        set_gguf_activations(mode)
        state[key] = session.greedy(state[key])

    exact_t, int16_t, llama_t = [], [], []
    for _ in range(DECODE_STEPS):
        exact_t.append(timed(lambda: our_step("fp32", sessions[0], "exact"))[1])
        int16_t.append(timed(lambda: our_step("int16", sessions[1], "int16"))[1])
        llama_t.append(timed(llama_step)[1])
    # quality: both caches fed the exact mode's greedy tokens
    agree, dmax, token = 0, 0.0, state["exact"]
    for _ in range(DECODE_STEPS):
        set_gguf_activations("fp32")
        exact = sessions[0].logits(token)
        set_gguf_activations("int16")
        fast = sessions[1].logits(token)
        agree += int(exact.argmax()) == int(fast.argmax())
        dmax = max(dmax, float((exact - fast).abs().max()))
        token = int(exact.argmax())
    set_gguf_activations("fp32")
    e, f, lt = (statistics.median(t[2:]) for t in (exact_t, int16_t, llama_t))
    return {"ours_tps": 1 / e, "ours_int16_tps": 1 / f, "llama_tps": 1 / lt,
            "ratio": statistics.median(l / o for o, l in zip(exact_t[2:], llama_t[2:])),
            "int16_ratio": statistics.median(l / o for o, l in zip(int16_t[2:], llama_t[2:])),
            "ours_prefill_tps": PROMPT_TOKENS / statistics.median(ours_p),
            "llama_prefill_tps": PROMPT_TOKENS / statistics.median(llama_p),
            "prefill_ratio": statistics.median(l / o for o, l in zip(ours_p, llama_p)),
            "int16_top1_agreement": agree / DECODE_STEPS, "int16_max_abs_dlogit": dmax}


def int8_quality():
    """int8 vs bf16 (both on the extension): teacher-forced top-1 agreement and mean |Δlogit| on greedy
    continuations, and perplexity of the shipped text."""
    from gemma3_fast.loading import load_model_and_tokenizer

    bf16, tok = load_model_and_tokenizer(None, "bfloat16", "cpu", "extension")
    int8, _ = load_model_and_tokenizer(None, "bfloat16", "cpu", "extension", quantize="int8")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three laws of thermodynamics are", TEXT[:400]]
    agree, total, dlogit = 0, 0, []
    for p in prompts:
        ids = torch.tensor(tok.encode(p))
        cache = bf16.new_cache(len(ids) + 48)
        seq, token = ids.tolist(), bf16.prefill(ids, cache).argmax(-1)
        for _ in range(48):
            seq.append(int(token))
            token = bf16.decode(token, cache).argmax(-1)
        full = torch.tensor(seq)
        with torch.inference_mode():
            a = bf16(full, torch.arange(len(full)), None, all_logits=True)[len(ids) - 1:].float()
            b = int8(full, torch.arange(len(full)), None, all_logits=True)[len(ids) - 1:].float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        dlogit.append((a - b).abs().mean().item())

    def perplexity(model):
        ids = torch.tensor(tok.encode(TEXT))
        cache, nll = model.new_cache(len(ids)), 0.0
        for s in range(0, len(ids) - 1, 256):
            chunk = ids[s:s + 256]
            logits = model.prefill(chunk, cache, all_logits=True).float()
            targets = ids[s + 1:s + 1 + len(chunk)]
            nll += torch.nn.functional.cross_entropy(logits[:len(targets)], targets, reduction="sum").item()
        return float(torch.exp(torch.tensor(nll / (len(ids) - 1))))

    ppl_bf16, ppl_int8 = perplexity(bf16), perplexity(int8)
    return {"top1_agreement": agree / total, "mean_abs_dlogit": statistics.mean(dlogit), "ppl_bf16": ppl_bf16,
            "ppl_int8": ppl_int8, "ppl_ratio": ppl_int8 / ppl_bf16, "positions": total}


def child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    kind = spec["engine"]
    if kind == "gemma3_fast":
        out = bench_gemma3_fast(spec["backend"], spec["dtype"], spec["quantize"], spec["long"])
    elif kind == "transformers":
        out = bench_transformers(spec["dtype"])
    elif kind == "llama.cpp":
        out = bench_llama_cpp(spec["threads"])
    elif kind == "head_to_head":
        out = bench_head_to_head(spec["dtype"])
    elif kind == "int8_vs_bf16":
        out = bench_int8_vs_bf16()
    elif kind == "native_vs_llama_cpp":
        out = bench_native_vs_llama_cpp(spec["threads"])
    else:
        out = int8_quality()
    out.setdefault("peak_rss_mib", peak_rss_mib())
    return out


def peak_rss_mib() -> float:
    """The process's peak resident set so far (ru_maxrss): anonymous memory and every file page mapped and
    touched (a GGUF's or a safetensors file's), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- parent: the table ---------------------------------------------------------------------------------------
class BandwidthProbe:
    """Read bandwidth, sampled between decode steps: one sum over a 256 MiB fp32 buffer per sample, the median
    reported. A shared host's bandwidth drifts by up to 2x over seconds, so a row's roofline is measured during
    its own decode loop, not before it. The buffer is on huge pages, like the package's weights (see
    gemma3_fast/huge_pages.py): 4 KiB pages read slower, and would flatter a kernel reading huge pages."""

    def __init__(self):
        from gemma3_fast.huge_pages import huge_page_buffer

        self.buf = huge_page_buffer(256 << 20).view(torch.float32)
        self.buf.fill_(1.0)  # touched: untouched pages read as the shared zero page
        self.buf.sum()
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(self.buf.numel() * 4 / timed(self.buf.sum)[1] / 1e9)

    def median(self) -> float:
        return statistics.median(self.samples)


def run_child(spec: dict) -> dict | None:
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  {spec['engine']} {spec.get('dtype', '')}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--llama-cpp", action="store_true", help="add a llama-cpp-python row (if installed)")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every engine this many times, in turn, and report medians (shared hosts drift)")
    ap.add_argument("--json", default=str(HERE / "raw" / "e2e.json"),
                    help="the raw results (default bench/raw/e2e.json; `python bench/report.py` makes the table)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    from gemma3_fast.loading import default_model_dir, load_model_and_tokenizer

    default_model_dir(quiet=False)  # convert once, outside the timed children
    load_model_and_tokenizer(None)  # and the GGUF's tokenizer cached, as every run after the first finds it
    engines = [e for e in ENGINES if not (args.no_transformers and e[0] == "transformers")]
    if args.llama_cpp:
        engines.append(("llama.cpp", "-", "q4_k_m", "none"))
    runs: dict[tuple, list[dict]] = {}
    head_to_head: dict[str, list[dict]] = {}
    int8_vs_bf16: list[dict] = []
    native_vs_llama: list[dict] = []
    for rnd in range(args.rounds):
        for engine, backend, dtype, quant in engines:
            print(f"round {rnd + 1}/{args.rounds}: {engine} {backend} {dtype} {quant} ...", file=sys.stderr, flush=True)
            spec = dict(engine=engine, backend=backend, dtype=dtype, quantize=quant, threads=args.threads,
                        long=(engine == "gemma3_fast" and backend == "extension"))
            res = run_child(spec)
            if res is not None:
                runs.setdefault((engine, backend, dtype, quant), []).append({**spec, **res})
        for dtype in () if args.no_transformers else ("float32", "bfloat16"):
            print(f"round {rnd + 1}/{args.rounds}: head to head, {dtype} ...", file=sys.stderr, flush=True)
            res = run_child(dict(engine="head_to_head", dtype=dtype, threads=args.threads))
            if res is not None:
                head_to_head.setdefault(dtype, []).append(res)
        print(f"round {rnd + 1}/{args.rounds}: int8 vs bf16, one process ...", file=sys.stderr, flush=True)
        res = run_child(dict(engine="int8_vs_bf16", threads=args.threads))
        if res is not None:
            int8_vs_bf16.append(res)
        if args.llama_cpp:
            print(f"round {rnd + 1}/{args.rounds}: native GGUF vs llama.cpp, one process ...", file=sys.stderr,
                  flush=True)
            res = run_child(dict(engine="native_vs_llama_cpp", threads=args.threads))
            if res is not None:
                native_vs_llama.append(res)
    rows = []  # per engine: the median of each number over the rounds
    for results in runs.values():
        row = dict(results[0])
        for key, value in results[0].items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in results)
        row["rounds"] = len(results)
        rows.append(row)
    quality = run_child(dict(engine="quality", threads=args.threads))

    data = {"kind": "e2e", "machine": machine_info(args.threads), "rounds": args.rounds, "rows": rows,
            "quality": quality, "head_to_head": head_to_head, "int8_vs_bf16": int8_vs_bf16,
            "native_vs_llama_cpp": native_vs_llama}
    print("\n" + render_e2e(data), end="")
    write_raw(Path(args.json), data)


if __name__ == "__main__":
    main()
