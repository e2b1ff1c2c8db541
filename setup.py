"""Builds gemma3_fast._C: the CPU kernels (always) and CUDA kernels from csrc/cuda/*.cu, when there are any and a
CUDA torch and nvcc are present (this release ships none: on a GPU the ops run their PyTorch reference).

Build against the torch already installed: `pip install --no-build-isolation .` (an isolated build would
download another torch, a multi-GB CUDA wheel). Environment switches:
  GEMMA3_FAST_CUDA=1 / 0   force / skip the CUDA kernels (default: build them if torch has CUDA and nvcc exists)
  GEMMA3_FAST_MARCH=...    -march value for the CPU kernels (default: native; e.g. x86-64-v3 for AVX2 machines)
  GEMMA3_FAST_REQUIRE_EXTENSION=1   fail the install when the extension does not build (default: install
                           without it, the package then runs on the PyTorch reference ops and says why)

The compiler is probed before the build (CXX, else c++): a flag it rejects (-march=native, -fopenmp) is left
out, with one line saying what that costs, instead of failing the build.
"""

import glob
import os
import shlex
import subprocess
import sys
import tempfile

here = os.path.dirname(os.path.abspath(__file__))
# Written next to the built module when the extension fails to build; gemma3_fast/ops.py shows it at import.
BUILD_ERROR_FILE = "_C_build_error.txt"


def note(message: str) -> None:
    print(f"gemma3_fast: {message}", flush=True)


def compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def compiles(cxx: list[str], flags: list[str], source: str = "int main() { return 0; }\n", link: bool = False,
             link_flags: tuple[str, ...] = ()) -> bool:
    """Whether `cxx flags` compiles (and, with link, links) `source` without an error or a warning."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = cxx + ["-Werror"] + flags + [src, "-o", os.path.join(tmp, "probe" if link else "probe.o")]
        cmd += list(link_flags) if link else ["-c"]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False


def cpu_target_flags(cxx: list[str]) -> list[str]:
    """-march (x86, and ARM GCC) or -mcpu (ARM clang) for this CPU; nothing if the compiler takes neither."""
    march = os.environ.get("GEMMA3_FAST_MARCH")
    if march:  # asked for by name: a compiler that rejects it is an error, not something to drop silently
        if not compiles(cxx, [f"-march={march}"]):
            sys.exit(f"gemma3_fast: GEMMA3_FAST_MARCH={march}, but {shlex.join(cxx)} rejects -march={march}")
        return [f"-march={march}"]
    for flag in ("-march=native", "-mcpu=native"):
        if compiles(cxx, [flag]):
            return [flag]
    note(f"{shlex.join(cxx)} accepts neither -march=native nor -mcpu=native: building for its default target, so "
         "on x86-64 the kernels take their scalar paths (several times slower than AVX2); ARM64 keeps NEON. "
         "Set GEMMA3_FAST_MARCH (e.g. x86-64-v3) to choose the target.")
    return []


OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def libomp_prefixes() -> list[str]:
    """Where Homebrew keeps libomp (macOS: Apple's clang has no OpenMP runtime of its own)."""
    found = []
    try:
        found.append(subprocess.run(["brew", "--prefix", "libomp"], capture_output=True, text=True,
                                    timeout=60).stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return [p for p in found + ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"] if p and os.path.isdir(p)]


def openmp_flags(cxx: list[str]) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for OpenMP, or none: at::parallel_for is a header template that runs on one
    thread when the extension is compiled without OpenMP (correct, but one core)."""
    if compiles(cxx, ["-fopenmp"], OPENMP_PROBE, link=True, link_flags=("-fopenmp",)):
        return ["-fopenmp"], ["-fopenmp"]
    if sys.platform == "darwin":
        for prefix in libomp_prefixes():
            cflags = ["-Xpreprocessor", "-fopenmp", f"-I{prefix}/include"]
            lflags = [f"-L{prefix}/lib", "-lomp", f"-Wl,-rpath,{prefix}/lib"]
            if compiles(cxx, cflags, OPENMP_PROBE, link=True, link_flags=tuple(lflags)):
                note(f"OpenMP from libomp in {prefix}")
                return cflags, lflags
    hint = " (`brew install libomp` brings it on macOS)" if sys.platform == "darwin" else ""
    note(f"{shlex.join(cxx)} has no OpenMP (-fopenmp failed){hint}: the kernels will run on one thread, so on N "
         "cores decode and prefill run up to N times slower.")
    return [], []


def want_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME
    import torch

    flag = os.environ.get("GEMMA3_FAST_CUDA", "auto")
    if flag == "0" or not glob.glob(os.path.join(here, "csrc/cuda/*.cu")):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("GEMMA3_FAST_CUDA=1 but this torch has no CUDA or nvcc was not found (CUDA_HOME)")
    return available


def shared_libstdcxx_link_args(cxx: list[str]) -> list[str]:
    """Link the shared libstdc++ that torch loaded, when the compiler would link a static copy instead.

    Some toolchains ship only libstdc++.a (seen: the GCC under /opt/gcc of a CUDA image). The linker then puts
    a private libstdc++ into _C. Its iostreams meet locale facets registered by torch's shared copy, and
    formatting a number into an error message (every TORCH_CHECK that prints a shape) segfaults instead of
    raising.
    """
    try:
        found = subprocess.run(cxx + ["-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    if os.path.isabs(found) or not os.path.exists("/proc/self/maps"):
        return []  # the compiler finds the shared library itself (the usual case), or this is not Linux
    with open("/proc/self/maps") as maps:  # torch is imported by now, so its libstdc++ is mapped
        loaded = sorted({line.split()[-1] for line in maps if "/libstdc++.so" in line})
    if not loaded:
        return []
    note(f"{shlex.join(cxx)} has no shared libstdc++; linking torch's {loaded[0]}")
    return [loaded[0]]


def extension():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cflags = ["-O3", "-std=c++17", "-DNDEBUG"]  # the probed target and OpenMP flags are added at build time
    kwargs = dict(extra_link_args=[], include_dirs=[os.path.join(here, "csrc")],
                  optional=os.environ.get("GEMMA3_FAST_REQUIRE_EXTENSION") != "1")
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-DGEMMA3_WITH_CUDA"]
        return CUDAExtension("gemma3_fast._C", sources, extra_compile_args={"cxx": cflags + ["-DGEMMA3_WITH_CUDA"],
                                                                            "nvcc": nvcc}, **kwargs)
    return CppExtension("gemma3_fast._C", sources, extra_compile_args={"cxx": cflags}, **kwargs)


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        """A failed build of the extension leaves an installed package that runs on the reference ops.

        The reason is printed and written next to the module's place (BUILD_ERROR_FILE), where the package's
        import warning shows it: pip hides a successful build's output.
        """

        def build_extensions(self):
            # The compiler is probed here, once, when something is built: not each time pip runs setup.py for
            # the package's metadata.
            cxx = compiler()
            omp_compile, omp_link = openmp_flags(cxx)
            cflags = cpu_target_flags(cxx) + omp_compile
            link = omp_link + shared_libstdcxx_link_args(cxx)
            for ext in self.extensions:
                ext.extra_compile_args["cxx"] += cflags
                ext.extra_link_args += link
            super().build_extensions()

        def run(self):
            # setuptools builds into build/ and copies back for --inplace and editable installs; the note goes
            # to both places, as the module would.
            self._into_source = bool(self.inplace or getattr(self, "editable_mode", False))
            super().run()

        def build_extension(self, ext):
            error_files = [os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), BUILD_ERROR_FILE)]
            if getattr(self, "_into_source", False):
                error_files.append(os.path.join(here, *ext.name.split(".")[:-1], BUILD_ERROR_FILE))
            for path in error_files:
                if os.path.exists(path):
                    os.remove(path)
            try:
                super().build_extension(ext)
            except Exception as e:  # compile or link errors: RuntimeError (ninja) or distutils' CompileError
                if not ext.optional:
                    raise
                reason = f"{type(e).__name__}: {e}".strip()
                for path in error_files:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with open(path, "w") as f:
                        f.write(f"{reason} (compiler: {shlex.join(compiler())})\n")
                note(f"the C++ extension did not build ({reason}). The package installs without it and runs on "
                     "the PyTorch reference ops (correct, several times slower). The compiler's messages are "
                     "above; set GEMMA3_FAST_REQUIRE_EXTENSION=1 to make this an error.")

    return OptionalBuildExtension


if __name__ == "__main__":  # as pip and `python setup.py` run it; tests import the probes without building
    from setuptools import setup

    setup(ext_modules=[extension()], cmdclass={"build_ext": build_ext_class()})
