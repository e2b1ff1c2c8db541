"""The docs stay true to the code: the README's size, every relative link (files and #anchors), the op table
against csrc/ops.cpp, the README's results against the committed benchmark table, no generated megabytes in git,
and bench/report.py's tables from raw JSON."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose(path: Path) -> list[str]:
    """The file's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercased, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _prose(path):
        m = re.match(r"#+\s+(.*)", line)
        if m:
            text = re.sub(r"[`*]", "", m.group(1)).strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/ (the limit is 250)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for line in _prose(doc):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            if not dest.exists():
                broken.append(f"{target}: no {dest}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: broken links: {broken}"


def test_op_table_lists_every_op():
    schemas = re.findall(r'm\.def\("(\w+)\(', (ROOT / "csrc" / "ops.cpp").read_text())
    assert len(schemas) >= 18
    table = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    missing = [op for op in schemas if f"| `{op}` |" not in table]
    assert not missing, f"ops in csrc/ops.cpp without a row in docs/ARCHITECTURE.md's op table: {missing}"


def test_readme_results_equal_the_committed_table():
    readme = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(readme) if line.startswith("<!-- results:e2e"))
    rows = []
    for line in readme[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    committed = (ROOT / "bench" / "results" / "e2e.md").read_text().splitlines()
    assert len(rows) >= 4 and all(row in committed for row in rows), (
        "the README's results table differs from bench/results/e2e.md (regenerate with `python bench/report.py` "
        "and copy the table)")


def test_no_large_tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = [(name, size) for name in out.decode().split("\0") if name
           for size in [(ROOT / name).stat().st_size if (ROOT / name).is_file() else 0] if size > 1 << 20]
    assert not big, f"tracked files over 1 MB (raw benchmark output belongs in bench/raw/, ignored): {big}"


def test_raw_benchmark_output_is_ignored():
    out = subprocess.run(["git", "check-ignore", "-q", "bench/raw/ops.json"], cwd=ROOT)
    assert out.returncode == 0, "bench/raw/ must be in .gitignore"


# -- bench/report.py ----------------------------------------------------------------------------------------
def _pytest_benchmark_json():
    def bench(group, impl, median):
        return {"group": group, "extra_info": {"impl": impl}, "stats": {"median": median}}

    return {"machine_info": {"cpu": {"brand_raw": "Test CPU", "flags": ["avx2", "fma", "sse4_2"]}},
            "benchmarks": [bench("rms_norm-fp32-T1", "extension", 2e-6), bench("rms_norm-fp32-T1", "reference", 8e-6),
                           bench("rms_norm-fp32-T1", "builtin", 4e-6),
                           bench("linear-int8-decode-qkv", "extension", 1e-5),
                           bench("linear-int8-decode-qkv", "reference", 1.5e-4)]}


def test_report_ops_table():
    table = _report().render({**_pytest_benchmark_json()})
    assert "Machine: Test CPU (avx2, fma)." in table
    assert "| rms_norm | fp32 | T1 | 2.0 µs | 8.0 µs | 4.0 µs | 4.0× | 2.0× |" in table
    assert "| linear | int8 | decode-qkv | 10.0 µs | 150.0 µs | - | 15.0× | - |" in table


def test_report_train_and_e2e_tables():
    report = _report()
    train = {"kind": "train", "machine": "Test CPU (avx2)", "threads": 2, "torch": "2.x", "dtype": "float32",
             "rounds": 2, "rows": [
                 {"shape": "tiny", "batch": 8, "seq_len": 256, "engine": "gemma3_fast", "ops": "extension",
                  "step_s": 0.5, "tokens_per_s": 4096.0, "peak_rss_mib": 600.0},
                 {"shape": "tiny", "batch": 8, "seq_len": 256, "engine": "transformers", "ops": "sdpa",
                  "step_s": 1.0, "tokens_per_s": 2048.0, "peak_rss_mib": 1200.0}]}
    assert "| tiny | 8 x 256 | gemma3_fast | extension | 0.500 | 4096 | 600 | 2.00x | 0.50x |" in report.render(train)
    row = {"engine": "gemma3_fast", "backend": "extension", "dtype": "bfloat16", "quantize": "none",
           "prefill_tps": 1500.0, "decode_tps": 50.0, "bandwidth_gbs": 40.0, "bytes_per_token": 4e8,
           "peak_rss_mib": 700.0}
    e2e = {"kind": "e2e", "machine": {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.x"}, "rounds": 1,
           "rows": [row, {**row, "engine": "transformers", "backend": "sdpa", "decode_tps": 20.0}],
           "head_to_head": {"bfloat16": [{"ratio": 3.0, "ours_tps": 60.0, "hf_tps": 20.0}]}}
    text = report.render(e2e)
    assert "| gemma3_fast | extension | bfloat16 | 1500 | 50.0 | 40.0 | 100.0 | 0.50 | 700 |" in text
    assert "- decode vs transformers, bfloat16, rows above: 2.50x" in text
    assert "one process, steps alternating: 3.00x (60.0 vs 20.0 tok/s; per round 3.00x)" in text
    with pytest.raises(ValueError, match="unknown raw benchmark file"):
        report.render({"rows": []})


def test_report_writes_every_raw_file(tmp_path):
    raw, results = tmp_path / "raw", tmp_path / "results"
    raw.mkdir()
    (raw / "ops.json").write_text(json.dumps(_pytest_benchmark_json()))
    written = _report().write_results(raw, results)
    assert written == [results / "ops.md"]
    text = (results / "ops.md").read_text()
    assert text.startswith("<!-- generated by `python bench/report.py` from bench/raw/ops.json")
    assert "| rms_norm | fp32 | T1 |" in text
    assert not list(results.glob("*.tmp"))


def test_committed_tables_are_generated():
    for path in sorted((ROOT / "bench" / "results").glob("*.md")):
        assert path.read_text().startswith("<!-- generated by `python bench/report.py`"), path
