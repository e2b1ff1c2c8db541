"""Markdown table of a pytest-benchmark JSON file: median per impl and the speedup of the extension.

    python bench/report.py bench/ops.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["extra_info"]["impl"]] = b["stats"]["median"]
    machine = data.get("machine_info", {})
    print(f"<!-- {machine.get('cpu', {}).get('brand_raw', '?')}, torch threads as configured -->")
    print("| op | dtype | shape | extension | reference | builtin | ref / ext | builtin / ext |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for group in groups:  # in the order the benchmarks ran (their parametrization)
        op, dt, shape = group.split("-", 2)
        m = groups[group]
        ext = m.get("extension")

        def us(k):
            return f"{m[k] * 1e6:.1f} µs" if k in m else "-"

        def ratio(k):
            return f"{m[k] / ext:.1f}×" if ext and k in m else "-"

        print(f"| {op} | {dt} | {shape} | {us('extension')} | {us('reference')} | {us('builtin')} | "
              f"{ratio('reference')} | {ratio('builtin')} |")


if __name__ == "__main__":
    main(sys.argv[1])
