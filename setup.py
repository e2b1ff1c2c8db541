"""Builds gemma3_fast._C: the CPU kernels (always) and CUDA kernels from csrc/cuda/*.cu, when there are any and a
CUDA torch and nvcc are present (this release ships none: on a GPU the ops run their PyTorch reference).

Build against the torch already installed: `pip install --no-build-isolation .` (an isolated build would
download another torch, a multi-GB CUDA wheel). Environment switches:
  GEMMA3_FAST_CUDA=1 / 0   force / skip the CUDA kernels (default: build them if torch has CUDA and nvcc exists)
  GEMMA3_FAST_MARCH=...    -march value for the CPU kernels (default: native; e.g. x86-64-v3 for AVX2 machines)
"""

import glob
import os
import shlex
import subprocess

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

here = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    flag = os.environ.get("GEMMA3_FAST_CUDA", "auto")
    if flag == "0" or not glob.glob("csrc/cuda/*.cu"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("GEMMA3_FAST_CUDA=1 but this torch has no CUDA or nvcc was not found (CUDA_HOME)")
    return available


def shared_libstdcxx_link_args() -> list[str]:
    """Link the shared libstdc++ that torch loaded, when the compiler would link a static copy instead.

    Some toolchains ship only libstdc++.a (seen: the GCC under /opt/gcc of a CUDA image). The linker then puts
    a private libstdc++ into _C. Its iostreams meet locale facets registered by torch's shared copy, and
    formatting a number into an error message (every TORCH_CHECK that prints a shape) segfaults instead of
    raising.
    """
    try:
        found = subprocess.run(shlex.split(os.environ.get("CXX", "c++")) + ["-print-file-name=libstdc++.so"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found) or not os.path.exists("/proc/self/maps"):
        return []  # the compiler finds the shared library itself (the usual case), or this is not Linux
    with open("/proc/self/maps") as maps:  # torch is imported above, so its libstdc++ is mapped
        loaded = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    if not loaded:
        return []
    print(f"gemma3_fast: {os.environ.get('CXX', 'c++')} has no shared libstdc++; linking torch's {loaded[0]}")
    return [loaded[0]]


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    march = os.environ.get("GEMMA3_FAST_MARCH", "native")
    # OpenMP matters: at::parallel_for is a header template that runs on one thread without it.
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-march={march}", "-DNDEBUG"]
    kwargs = dict(extra_link_args=["-fopenmp"] + shared_libstdcxx_link_args(), include_dirs=[os.path.join(here, "csrc")])
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-DGEMMA3_WITH_CUDA"]
        return CUDAExtension("gemma3_fast._C", sources, extra_compile_args={"cxx": cxx + ["-DGEMMA3_WITH_CUDA"],
                                                                            "nvcc": nvcc}, **kwargs)
    return CppExtension("gemma3_fast._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
