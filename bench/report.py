"""The benchmarks' tables: markdown rendered from their raw JSON.

    python bench/report.py                     # every bench/raw/*.json -> bench/results/<name>.md
    python bench/report.py bench/raw/ops.json  # one file's table on stdout

Raw JSON (pytest-benchmark's dumps run to megabytes) lives in bench/raw/, which git ignores. What is committed
is bench/results/*.md: the small tables the README and docs/PERFORMANCE.md quote. Each benchmark writes its raw
file there by default (see docs/PERFORMANCE.md, "Running the benchmarks"):

    pytest bench/test_ops_bench.py --benchmark-only --benchmark-json=bench/raw/ops.json
    python bench/e2e.py            # bench/raw/e2e.json
    python bench/train.py          # bench/raw/train.json
    python bench/serve.py          # bench/raw/serve.json

Four kinds of raw file, told apart by their content: pytest-benchmark's (`benchmarks`), bench/e2e.py's
(`kind: e2e`), bench/train.py's (`kind: train`) and bench/serve.py's (`kind: serve`). This module imports no torch, so it runs anywhere.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
RAW, RESULTS = HERE / "raw", HERE / "results"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "asimd", "sve")


def cpu_description(flags: set[str] | None = None, name: str | None = None) -> str:
    """'<model name> (<the ISA flags the kernels use>)': every number is quoted with the CPU's flags."""
    if name is None or flags is None:
        try:
            info = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            info = []
        name = name or next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")),
                            platform.processor() or platform.machine())
        flags = flags if flags is not None else set(
            next((ln.split(":", 1)[1].split() for ln in info if ln.startswith(("flags", "Features"))), []))
    isa = [f for f in ISA_FLAGS if f in flags]
    return f"{name} ({', '.join(isa)})" if isa else name


def machine_info(threads: int) -> dict:
    import torch  # only the benchmarks that measure call this

    return {"cpu": cpu_description(), "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__}


# -- pytest-benchmark: per-op medians -------------------------------------------------------------------------
def render_ops(data: dict) -> str:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["impl"]] = b["stats"]["median"]
    cpu = data.get("machine_info", {}).get("cpu", {})
    lines = [f"Machine: {cpu_description(set(cpu.get('flags', [])), cpu.get('brand_raw', '?'))}. "
             "Median time per call; ratios are the extension's speedup.", "",
             "| op | dtype | shape | extension | reference | builtin | ref / ext | builtin / ext |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for group, m in groups.items():  # in the order the benchmarks ran (their parametrization)
        op, dt, shape = group.split("-", 2)
        ext = m.get("extension")

        def us(k):
            return f"{m[k] * 1e6:.1f} µs" if k in m else "-"

        def ratio(k):
            return f"{m[k] / ext:.1f}×" if ext and k in m else "-"

        lines.append(f"| {op} | {dt} | {shape} | {us('extension')} | {us('reference')} | {us('builtin')} | "
                     f"{ratio('reference')} | {ratio('builtin')} |")
    return "\n".join(lines) + "\n"


# -- bench/e2e.py: end to end -----------------------------------------------------------------------------------
def render_e2e(data: dict) -> str:
    rows, quality = data["rows"], data.get("quality")
    head_to_head, int8_vs_bf16 = data.get("head_to_head", {}), data.get("int8_vs_bf16", [])
    mach = data["machine"]
    out = [f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['threads']} threads, torch {mach['torch']}. "
           "Bandwidth: median of 256 MiB reads (huge pages) between the row's own decode steps. "
           f"Medians of {data['rounds']} rounds.", "",
           "| engine | backend | weights | prefill 512 tok/s | decode tok/s | bandwidth GB/s | roofline tok/s "
           "| decode / roofline | peak RSS MiB |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    bytes_per_token = {(r["dtype"], r["quantize"]): r["bytes_per_token"] for r in rows if "bytes_per_token" in r}
    bytes_per_token[("q4_k_m", "none")] = bytes_per_token.get(("auto", "none"))  # llama.cpp: the same file
    for r in rows:
        weights = "int8" if r["quantize"] == "int8" else "gguf q4_k_m" if r["dtype"] == "auto" else r["dtype"]
        nbytes = bytes_per_token.get((r["dtype"], r["quantize"]))
        bw = r["bandwidth_gbs"]
        roof = bw * 1e9 / nbytes if nbytes else None
        roof_s = f"{roof:.1f}" if roof else "-"
        ratio = f"{r['decode_tps'] / roof:.2f}" if roof else "-"
        out.append(f"| {r['engine']} | {r['backend']} | {weights} | {r['prefill_tps']:.0f} | {r['decode_tps']:.1f} | "
                   f"{bw:.1f} | {roof_s} | {ratio} | {r['peak_rss_mib']:.0f} |")

    def find(engine, backend, dtype, quant="none"):
        return next((r for r in rows if (r["engine"], r["backend"], r["dtype"], r["quantize"]) ==
                     (engine, backend, dtype, quant)), None)

    def per_round(runs, key):
        return ", ".join("%.2fx" % r[key] for r in runs)

    out.append("")
    native, llama = find("gemma3_fast", "extension", "auto"), find("llama.cpp", "-", "q4_k_m")
    if native and llama:
        decode, prefill = (native[k] / llama[k] for k in ("decode_tps", "prefill_tps"))
        out.append(f"- native GGUF vs llama.cpp, same file, rows above: decode {decode:.2f}x, prefill {prefill:.2f}x, "
                   f"peak RSS {native['peak_rss_mib']:.0f} vs {llama['peak_rss_mib']:.0f} MiB")
    vs_llama = data.get("native_vs_llama_cpp", [])
    if vs_llama:
        med = {k: statistics.median(r[k] for r in vs_llama) for k in
               ("ratio", "ours_tps", "llama_tps", "prefill_ratio", "ours_prefill_tps", "llama_prefill_tps")}
        out.append(f"- native GGUF vs llama.cpp, one process, steps alternating: decode {med['ratio']:.2f}x "
                   f"({med['ours_tps']:.1f} vs {med['llama_tps']:.1f} tok/s; per round "
                   f"{per_round(vs_llama, 'ratio')}), prefill 512 {med['prefill_ratio']:.2f}x "
                   f"({med['ours_prefill_tps']:.0f} vs {med['llama_prefill_tps']:.0f} tok/s)")
        if "int16_ratio" in vs_llama[0]:
            m16 = {k: statistics.median(r[k] for r in vs_llama) for k in
                   ("int16_ratio", "ours_int16_tps", "int16_top1_agreement")}
            worst = max(r["int16_max_abs_dlogit"] for r in vs_llama)
            out.append(f"- the same, ours with `--gguf-activations int16`: decode {m16['int16_ratio']:.2f}x "
                       f"({m16['ours_int16_tps']:.1f} tok/s; per round {per_round(vs_llama, 'int16_ratio')}); "
                       "against the exact mode over 128 teacher-forced steps: top-1 agreement "
                       f"{m16['int16_top1_agreement']:.3f}, max |dlogit| {worst:.2e}")
    for dtype in ("float32", "bfloat16"):
        ours, hf = find("gemma3_fast", "extension", dtype), find("transformers", "sdpa", dtype)
        if ours and hf:
            out.append(f"- decode vs transformers, {dtype}, rows above: {ours['decode_tps'] / hf['decode_tps']:.2f}x")
        h2h = head_to_head.get(dtype)
        if h2h:
            med = {k: statistics.median(r[k] for r in h2h) for k in ("ratio", "ours_tps", "hf_tps")}
            out.append(f"- decode vs transformers, {dtype}, one process, steps alternating: {med['ratio']:.2f}x "
                       f"({med['ours_tps']:.1f} vs {med['hf_tps']:.1f} tok/s; per round {per_round(h2h, 'ratio')})")
    hf32 = find("transformers", "sdpa", "float32")
    for dtype, quant in (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")):
        ours = find("gemma3_fast", "extension", dtype, quant)
        if ours and hf32:
            out.append(f"- prefill vs transformers fp32, ours {dtype}/{quant}: "
                       f"{ours['prefill_tps'] / hf32['prefill_tps']:.2f}x")
    for dtype, h2h in head_to_head.items():
        if h2h and "prefill_ratio" in h2h[0]:
            med = {k: statistics.median(r[k] for r in h2h) for k in ("prefill_ratio", "ours_prefill_tps",
                                                                      "hf_prefill_tps")}
            out.append(f"- prefill vs transformers {dtype}, one process, runs alternating: {med['prefill_ratio']:.2f}x "
                       f"({med['ours_prefill_tps']:.0f} vs {med['hf_prefill_tps']:.0f} tok/s; per round "
                       f"{per_round(h2h, 'prefill_ratio')})")
        if h2h and "bf16_math_prefill_ratio" in h2h[0]:
            med = {k: statistics.median(r[k] for r in h2h) for k in ("bf16_math_prefill_ratio",
                                                                      "ours_bf16_math_prefill_tps", "hf_prefill_tps")}
            out.append(f"- prefill vs transformers {dtype}, one process, runs alternating, ours with "
                       f"torch.backends.mkldnn.matmul.fp32_precision='bf16' (opt-in): "
                       f"{med['bf16_math_prefill_ratio']:.2f}x ({med['ours_bf16_math_prefill_tps']:.0f} vs "
                       f"{med['hf_prefill_tps']:.0f} tok/s; per round {per_round(h2h, 'bf16_math_prefill_ratio')})")
    b16, i8 = find("gemma3_fast", "extension", "bfloat16"), find("gemma3_fast", "extension", "bfloat16", "int8")
    if b16 and i8:
        out.append(f"- int8 decode vs bf16 decode, rows above: {i8['decode_tps'] / b16['decode_tps']:.2f}x")
    if int8_vs_bf16:
        med = {k: statistics.median(r[k] for r in int8_vs_bf16) for k in ("ratio", "int8_tps", "bf16_tps")}
        out.append(f"- int8 decode vs bf16 decode, one process, steps alternating: {med['ratio']:.2f}x "
                   f"({med['int8_tps']:.1f} vs {med['bf16_tps']:.1f} tok/s; per round "
                   f"{per_round(int8_vs_bf16, 'ratio')})")
    for r in rows:
        if "decode_tps_pos4000" in r:
            out.append(f"- decode at position ~4000 vs ~100 (steps interleaved), {r['dtype']}/{r['quantize']}: "
                       f"{r['decode_tps_pos4000']:.1f} vs {r['decode_tps_pos100']:.1f} tok/s "
                       f"({r['decode_tps_pos4000'] / r['decode_tps_pos100']:.2f}x)")
    if quality:
        out.append(f"- int8 vs bf16 quality: teacher-forced top-1 agreement {quality['top1_agreement']:.3f} over "
                   f"{quality['positions']} positions, mean |Δlogit| {quality['mean_abs_dlogit']:.3f}, perplexity "
                   f"{quality['ppl_int8']:.3f} vs {quality['ppl_bf16']:.3f} ({(quality['ppl_ratio'] - 1) * 100:+.2f}%)")
    return "\n".join(out) + "\n"


# -- bench/train.py: training steps ---------------------------------------------------------------------------
def render_train(data: dict) -> str:
    out = [f"Machine: {data['machine']}, {data['threads']} threads, torch {data['torch']}, {data['dtype']}. "
           f"Medians over {data['rounds']} rounds; each row its own process.", "",
           "| shape | batch x tokens | engine | ops | step s | tokens/s | peak RSS MiB | vs transformers tok/s | "
           "vs transformers RSS |",
           "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for shape in dict.fromkeys(r["shape"] for r in data["rows"]):
        rows = [r for r in data["rows"] if r["shape"] == shape]
        base = next((r for r in rows if (r["engine"], r["ops"]) == ("transformers", "sdpa")), None)
        for m in rows:
            speed = f"{m['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            rss = f"{m['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
            out.append(f"| {shape} | {m['batch']} x {m['seq_len']} | {m['engine']} | {m['ops']} | "
                       f"{m['step_s']:.3f} | {m['tokens_per_s']:.0f} | {m['peak_rss_mib']:.0f} | {speed} | {rss} |")
    return "\n".join(out) + "\n"


def render_serve(data: dict) -> str:
    m = data["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}. `python bench/serve.py`: "
           f"~{data['prompt_tokens']}-token prompts, {data['new_tokens']} new tokens each, temperature 0, N requests "
           "at concurrency C through the HTTP API (streamed). TTFT: time to the first token; TPOT: (latency - "
           "TTFT) / (tokens - 1); ITL: gaps between streamed tokens; all medians unless p99. Decode step (mean), mean "
           "batch and prefill share (of the wall time) are the server's own counters from /metrics.", "",
           "| server | C | requests | output tok/s | × its C=1 | TTFT ms | TTFT p99 ms | TPOT ms | TPOT p99 ms | "
           "ITL ms | ITL p99 ms | decode step ms | mean batch | prefill share | server RSS MiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in data["runs"].items():
        base = next((r["output_tps"] for r in rows if r["concurrency"] == 1), None)
        for r in rows:
            ratio = f"{r['output_tps'] / base:.2f}" if base else "-"
            out.append(f"| {name} | {r['concurrency']} | {r['requests']} | {r['output_tps']:.1f} | {ratio} | "
                       f"{r['ttft_median'] * 1e3:.0f} | {r['ttft_p99'] * 1e3:.0f} | {r['tpot_median'] * 1e3:.1f} | "
                       f"{r['tpot_p99'] * 1e3:.1f} | {r['itl_median'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.0f} | "
                       + (f"{r['step_ms']:.1f} | {r['mean_batch']:.1f} | {r['prefill_share']:.2f} | " if "step_ms" in r
                          else "- | - | - | ") + f"{r['rss_mib']:.0f} |")
    s = data.get("soak")
    if s:
        k = s["by_kind"]
        out += ["", f"Soak ({s['config']}): {s['requests']} requests at C = {s['concurrency']} in {s['wall_s']:.0f} s "
                f"({k['ok']} to finish, {k['cancel']} closed after 3 tokens, {k['bad']} malformed): "
                f"{s['n_failures']} failures; after it {s['running_after']:.0f} running, {s['queued_after']:.0f} "
                f"queued; server RSS {s['rss_mib']['after_first_50']:.0f} MiB after the first 50, "
                f"{s['rss_mib']['end']:.0f} at the end ({s['rss_growth'] * 100:+.1f}%)."]
    return "\n".join(out) + "\n"


def render(data: dict) -> str:
    if "benchmarks" in data:
        return render_ops(data)
    renderers = {"e2e": render_e2e, "train": render_train, "serve": render_serve}
    kind = data.get("kind")
    if kind not in renderers:
        raise ValueError(f"unknown raw benchmark file: expected pytest-benchmark JSON or kind "
                         f"{sorted(renderers)}, got kind={kind!r}")
    return renderers[kind](data)


def write_raw(path: Path, data: dict) -> None:
    """A benchmark's raw numbers, written whole or not at all (a run takes minutes; an interrupted one keeps the
    previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)
    print(f"raw numbers: {path} (tables: python bench/report.py)", file=sys.stderr)


def write_results(raw_dir: Path = RAW, results_dir: Path = RESULTS) -> list[Path]:
    """Every raw JSON in raw_dir -> results_dir/<same name>.md, each headed by where it came from."""
    written = []
    for path in sorted(raw_dir.glob("*.json")):
        table = render(json.loads(path.read_text()))
        out = results_dir / (path.stem + ".md")
        results_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".md.tmp")
        tmp.write_text(f"<!-- generated by `python bench/report.py` from bench/raw/{path.name}; do not edit -->\n"
                       + table)
        tmp.replace(out)
        written.append(out)
    return written


def main(argv: list[str]) -> None:
    if argv:
        for path in argv:
            print(render(json.loads(Path(path).read_text())), end="")
        return
    written = write_results()
    if not written:
        sys.exit(f"no raw benchmark JSON in {RAW}: run a benchmark first (see this file's docstring)")
    for path in written:
        print(path.relative_to(HERE.parent))


if __name__ == "__main__":
    main(sys.argv[1:])
