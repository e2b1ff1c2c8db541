"""Serving benchmark (the vLLM serving-benchmark metrics) through the HTTP API: N requests at concurrency C against
`python -m gemma3_fast.serve`, and the same requests against llama-cpp-python's server on the same GGUF when it is
installed (pip install 'llama-cpp-python[server]').

    python bench/serve.py                     # bf16 and int8 (the default folder), the default GGUF; C = 1, 4, 8, 16
    python bench/serve.py --configs int8 --concurrency 1 8
    python bench/serve.py --soak              # also: 200 mixed requests at C = 16 (cancels, malformed ones)

Per request: TTFT (time to the first token's chunk), TPOT ((latency - TTFT) / (tokens - 1)), inter-token latencies
(gaps between chunks); per run: output tok/s (all tokens / wall time). Prompts are ~128-token slices of
bench/data/printing_press.txt, 64 new tokens each, temperature 0. Each server runs in its own process with the
machine's threads; the client's threads wait on the network. Writes bench/raw/serve.json (tables: bench/report.py)
and bench/results/serve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import machine_info, write_raw  # noqa: E402

TEXT = (HERE / "data" / "printing_press.txt").read_text()
PROMPT_TOKENS, NEW_TOKENS = 128, 64
CONFIGS = {  # name: server arguments (the folder's path is filled in at run time)
    "native": [],  # the default: the GGUF on its own blocks
    "bf16": ["--model", "{folder}", "--dtype", "bfloat16"],
    "int8": ["--model", "{folder}", "--dtype", "bfloat16", "--quantize", "int8"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(base: str, path: str, body: dict | bytes | None = None, timeout: float = 600):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Server:
    """A server process on a free port, healthy once started."""

    def __init__(self, command: list[str], health: str, startup_s: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # a pipe would fill up with llama.cpp's log and block it
        self.proc = subprocess.Popen([c.replace("{port}", str(self.port)) for c in command],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_s
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{command[:4]} exited: {self.log.read()[-2000:]}")
            try:
                if http(self.base, health, timeout=2)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[:4]} did not start")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts(n: int, seed: int = 0) -> list[str]:
    """n prompts of about PROMPT_TOKENS tokens: word slices of the text (4 characters a token, roughly)."""
    words = TEXT.split()
    rng = random.Random(seed)
    size = PROMPT_TOKENS * 3 // 4
    out = []
    for _ in range(n):
        s = rng.randrange(0, len(words) - size)
        out.append(" ".join(words[s:s + size]))
    return out


def stream_one(base: str, model: str, prompt: str, max_tokens: int, cancel_after: int = 0, seed: int = 0,
               temperature: float = 0.0) -> dict:
    """One streamed completion, timed chunk by chunk (raw SSE over HTTP: no client library in the timings)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    times, usage, finish, chunks = [], None, None, 0
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        times.append(time.perf_counter())
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                if cancel_after and chunks >= cancel_after:
                    return {"status": 200, "cancelled": True}
    except urllib.error.HTTPError as e:
        return {"status": e.code}
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    out = {"status": 200, "tokens": tokens, "finish": finish, "latency": end - t0}
    if times:
        out["ttft"] = times[0] - t0
        out["itl"] = [b - a for a, b in zip(times, times[1:])]
        out["tpot"] = (end - times[0]) / (tokens - 1) if tokens > 1 else None
    return out


def server_metrics(base: str) -> dict[str, float]:
    status, text = http(base, "/metrics")
    if status != 200:
        return {}
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def run_load(base: str, model: str, concurrency: int, n: int, seed: int) -> dict:
    ps = prompts(n, seed)
    before = server_metrics(base)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: stream_one(base, model, p, NEW_TOKENS), ps))
    wall = time.perf_counter() - t0
    bad = [r for r in results if r["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[:3]}")
    itl = sorted(x for r in results for x in r["itl"])
    tpot = sorted(r["tpot"] for r in results if r.get("tpot"))
    ttft = sorted(r["ttft"] for r in results)

    def p99(v):
        return v[min(len(v) - 1, int(0.99 * len(v)))]

    tokens = sum(r["tokens"] for r in results)
    after = server_metrics(base)
    engine = {}
    if before and after:  # gemma3_fast's own counters: decode steps (mean time, mean batch) and prefill time
        delta = {k: after[k] - before.get(k, 0) for k in after}
        steps = delta["gemma3_fast_decode_step_seconds_count"]
        engine = {"step_ms": 1e3 * delta["gemma3_fast_decode_step_seconds_sum"] / steps,
                  "mean_batch": (delta["gemma3_fast_generated_tokens_total"] - n) / steps,
                  "prefill_share": delta["gemma3_fast_prefill_seconds_total"] / wall}
    return {"concurrency": concurrency, "requests": n, "tokens": tokens, "wall_s": wall, **engine,
            "output_tps": tokens / wall, "ttft_median": statistics.median(ttft), "ttft_p99": p99(ttft),
            "tpot_median": statistics.median(tpot), "tpot_p99": p99(tpot),
            "itl_median": statistics.median(itl), "itl_p99": p99(itl)}


def soak(server: Server, model: str, total: int = 200, concurrency: int = 16) -> dict:
    """total requests at `concurrency`: mixed prompt and output lengths, 10% cancelled mid-stream, 10% malformed.
    Every valid one must finish with stop/length, every malformed one get a 400, /metrics end at 0 running, and the
    server's RSS after the last 50 stay within 5% of the RSS after the first 50."""
    rng = random.Random(7)
    malformed = [b"{not json", json.dumps({"prompt": "x", "max_tokens": -3}).encode(),
                 json.dumps({"prompt": "x", "temperature": "hot"}).encode(),
                 json.dumps({"model": "nope", "prompt": "x"}).encode()]
    jobs = []
    for i in range(total):
        kind = "bad" if i % 10 == 4 else "cancel" if i % 10 == 8 else "ok"
        text = TEXT.split()
        n = rng.randrange(10, 190)  # words: ~13 to ~250 tokens
        words = " ".join(text[(s := rng.randrange(0, len(text) - n)):s + n])
        jobs.append((i, kind, words, rng.randrange(8, 129)))
    rss = {}
    done = [0]
    lock = threading.Lock()

    def one(job):
        i, kind, prompt, max_tokens = job
        if kind == "bad":
            status, _ = http(server.base, "/v1/completions", malformed[i % len(malformed)])
            r = {"kind": kind, "ok": status == 400, "status": status}
        else:
            out = stream_one(server.base, model, prompt, max_tokens, cancel_after=3 if kind == "cancel" else 0,
                             seed=i, temperature=0.8)
            r = {"kind": kind, "ok": out["status"] == 200 and (kind == "cancel" or out["finish"] in ("stop", "length")),
                 "status": out["status"], "finish": out.get("finish")}
        with lock:
            done[0] += 1
            if done[0] == 50:
                rss["after_first_50"] = server.rss_mib()
        return r

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, jobs))
    wall = time.perf_counter() - t0
    deadline = time.monotonic() + 30
    while True:  # a cancelled stream frees its slot at the server's next step
        metrics = server_metrics(server.base)
        if metrics["gemma3_fast_requests_running"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    rss["end"] = server.rss_mib()
    by_kind = {k: sum(1 for r in results if r["kind"] == k) for k in ("ok", "cancel", "bad")}
    return {"requests": total, "concurrency": concurrency, "wall_s": wall, "by_kind": by_kind,
            "failures": [r for r in results if not r["ok"]][:10], "n_failures": sum(not r["ok"] for r in results),
            "running_after": metrics["gemma3_fast_requests_running"],
            "queued_after": metrics["gemma3_fast_requests_queued"],
            "cancelled_counted": metrics.get('gemma3_fast_requests_total{finish_reason="cancelled"}'),
            "rss_mib": rss, "rss_growth": rss["end"] / rss["after_first_50"] - 1}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in runs.items():
        cs = [r["concurrency"] for r in rows]
        a.plot(cs, [r["output_tps"] for r in rows], marker="o", label=name)
        b.plot(cs, [r["tpot_median"] * 1e3 for r in rows], marker="o", label=name)
    a.set(xlabel="concurrent requests", ylabel="output tok/s (all requests)", title="Throughput")
    b.set(xlabel="concurrent requests", ylabel="median TPOT (ms)", title="Time per output token")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument("--requests-per-slot", type=int, default=3, help="N = max(8, this x C) requests per run")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--soak", action="store_true", help="also the 200-request mixed soak on the default model")
    p.add_argument("--json", type=Path, default=HERE / "raw" / "serve.json")
    p.add_argument("--plot", type=Path, default=HERE / "results" / "serve.png")
    args = p.parse_args(argv)

    from gemma3_fast.loading import default_gguf_path, default_model_dir

    folder, gguf = default_model_dir(quiet=True), default_gguf_path(quiet=True)
    parallel = str(max(args.concurrency))
    servers = {name: [sys.executable, "-m", "gemma3_fast.serve", "--port", "{port}", "--parallel", parallel,
                      "--model-name", "bench", *[a.replace("{folder}", str(folder)) for a in CONFIGS[name]]]
               for name in args.configs}
    try:
        import llama_cpp.server.app  # noqa: F401

        if not args.no_llama_cpp:
            servers["llama-cpp-python"] = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                           "--model_alias", "bench", "--port", "{port}", "--n_ctx", "4096",
                                           "--n_threads", str(os.cpu_count()), "--n_batch", "512",
                                           # by default a new request cuts the running stream short
                                           "--interrupt_requests", "False"]
    except ImportError as e:
        print(f"llama-cpp-python's server is not installed ({e}): its rows are left out", file=sys.stderr)
    data = {"kind": "serve", "machine": machine_info(os.cpu_count()), "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS, "runs": {}, "soak": None}
    for name, command in servers.items():
        health = "/health" if name != "llama-cpp-python" else "/v1/models"
        server = Server(command, health)
        try:
            stream_one(server.base, "bench", prompts(1, 99)[0], 8)  # warm-up
            rows = []
            for c in args.concurrency:
                row = run_load(server.base, "bench", c, max(8, args.requests_per_slot * c), seed=c)
                row["rss_mib"] = server.rss_mib()
                rows.append(row)
                step = f", step {row['step_ms']:.1f} ms x {row['mean_batch']:.1f}" if "step_ms" in row else ""
                print(f"{name:>16} C={c:>2}: {row['output_tps']:6.1f} tok/s, TTFT {row['ttft_median'] * 1e3:6.0f} ms, "
                      f"TPOT {row['tpot_median'] * 1e3:5.1f} ms, ITL p99 {row['itl_p99'] * 1e3:5.0f} ms{step}", flush=True)
            data["runs"][name] = rows
            if args.soak and name == args.configs[0]:
                data["soak"] = soak(server, "bench")
                data["soak"]["config"] = name
                print(f"soak: {json.dumps({k: v for k, v in data['soak'].items() if k != 'failures'})}", flush=True)
        finally:
            server.close()
    write_raw(args.json, data)
    plot(data["runs"], args.plot)
    print(f"plot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
