"""The machine's arithmetic peak for the dot-product instructions the kernels use, 1 and 2 threads: the ceiling
against which a compute-bound kernel's rate (GMAC/s) is read.

    python bench/peak.py            # needs a C++ compiler (c++ or $CXX); x86-64 with AVX-512 (BF16, VNNI)

Each thread runs 12 independent accumulator chains of one instruction (register operands only, written as inline
assembly so the compiler cannot fold them), far more than the instruction's latency needs. Reported: instructions
per second and MACs per second (vdpbf16ps and vpdpwssd: 32 multiply-adds each, vpdpbusd 64, vfmadd231ps 16).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

INSTRUCTIONS = {"vdpbf16ps": 32, "vpdpwssd": 32, "vpdpbusd": 64, "vfmadd231ps": 16}

SOURCE = r"""
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#define CHAINS(INS) \
  INS " %%zmm30,%%zmm31,%%zmm0\n" INS " %%zmm30,%%zmm31,%%zmm1\n" INS " %%zmm30,%%zmm31,%%zmm2\n" \
  INS " %%zmm30,%%zmm31,%%zmm3\n" INS " %%zmm30,%%zmm31,%%zmm4\n" INS " %%zmm30,%%zmm31,%%zmm5\n" \
  INS " %%zmm30,%%zmm31,%%zmm6\n" INS " %%zmm30,%%zmm31,%%zmm7\n" INS " %%zmm30,%%zmm31,%%zmm8\n" \
  INS " %%zmm30,%%zmm31,%%zmm9\n" INS " %%zmm30,%%zmm31,%%zmm10\n" INS " %%zmm30,%%zmm31,%%zmm11\n"
#define CLOBBERS "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11"
#define LOOP(NAME, INS) \
  static double NAME(long n) { \
    auto t = std::chrono::steady_clock::now(); \
    for (long i = 0; i < n; ++i) asm volatile(CHAINS(INS) ::: CLOBBERS); \
    return 12.0 * n / std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count(); \
  }
LOOP(dpbf16, "vdpbf16ps")
LOOP(dpwssd, "vpdpwssd")
LOOP(dpbusd, "vpdpbusd")
LOOP(fmadd, "vfmadd231ps")
int main(int argc, char** argv) {
  double (*f)(long) = !strcmp(argv[1], "vdpbf16ps") ? dpbf16 : !strcmp(argv[1], "vpdpwssd") ? dpwssd
                    : !strcmp(argv[1], "vpdpbusd") ? dpbusd : fmadd;
  const int threads = atoi(argv[2]);
  std::vector<double> rate(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { rate[t] = f(50000000); });
  for (auto& t : pool) t.join();
  double total = 0;
  for (double r : rate) total += r;
  printf("%.4e\n", total);
}
"""


def main() -> None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        sys.exit("bench/peak.py needs a C++ compiler (c++, g++ or $CXX)")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    missing = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni") if f not in flags]
    if missing:
        sys.exit(f"bench/peak.py measures AVX-512 instructions; this CPU lacks {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([cxx, "-O2", "-march=native", "-pthread", str(src), "-o", str(exe)], check=True)
        cores = os.cpu_count() or 1
        print(f"{'instruction':<12} {'threads':>7} {'G instr/s':>10} {'GMAC/s':>8}")
        for threads in sorted({1, cores}):
            for name, macs in INSTRUCTIONS.items():
                rate = float(subprocess.run([str(exe), name, str(threads)], check=True, capture_output=True,
                                            text=True).stdout)
                print(f"{name:<12} {threads:>7} {rate / 1e9:>10.2f} {rate * macs / 1e9:>8.0f}")


if __name__ == "__main__":
    main()
