"""The install builds the extension (without it the kernel tests would only skip, so the first test fails), and
setup.py adapts to the compiler: flags it rejects are left out, and a build that fails still installs a package
that runs on the reference ops and says why."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma3_fast import ops

REPO = Path(__file__).resolve().parents[1]
REJECTING_CXX = REPO / "tests" / "tools" / "rejecting_cxx.sh"


def test_extension_is_built():
    if os.environ.get("GEMMA3_FAST_DISABLE_EXTENSION") == "1":
        return  # deliberately running the reference path
    assert ops.EXTENSION_AVAILABLE, ops.EXTENSION_ERROR
    native = ops.native_module()
    assert native.SIMD in ("avx512", "avx2", "neon", "scalar")
    assert isinstance(native.OPENMP, bool)


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its probes, without running setup()."""
    spec = importlib.util.spec_from_file_location("gemma3_fast_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rejecting(monkeypatch):
    """Point the probes at a compiler that rejects the given flags."""
    def use(*flags: str) -> list[str]:
        monkeypatch.setenv("CXX", str(REJECTING_CXX))
        monkeypatch.setenv("REJECT", " ".join(flags))
        monkeypatch.setenv("REAL_CXX", os.environ.get("CXX", "c++"))
        monkeypatch.delenv("GEMMA3_FAST_MARCH", raising=False)
        return [str(REJECTING_CXX)]
    return use


@pytest.mark.skipif(sys.platform != "linux", reason="Linux's GCC and clang take -fopenmp and a native target")
def test_probes_keep_what_the_compiler_accepts(setup_py, monkeypatch):
    monkeypatch.delenv("GEMMA3_FAST_MARCH", raising=False)
    cxx = setup_py.compiler()
    assert setup_py.openmp_flags(cxx) == (["-fopenmp"], ["-fopenmp"])
    assert setup_py.cpu_target_flags(cxx) in (["-march=native"], ["-mcpu=native"])


def test_probes_leave_out_rejected_flags_and_say_what_it_costs(setup_py, rejecting, capsys):
    cxx = rejecting("-fopenmp", "-march=native", "-mcpu=native")
    assert setup_py.openmp_flags(cxx) == ([], [])
    assert setup_py.cpu_target_flags(cxx) == []
    out = capsys.readouterr().out
    assert "has no OpenMP" in out and "one thread" in out
    assert "neither -march=native nor -mcpu=native" in out and "scalar paths" in out


def test_a_named_target_the_compiler_rejects_is_an_error(setup_py, monkeypatch):
    monkeypatch.setenv("GEMMA3_FAST_MARCH", "no-such-cpu")
    with pytest.raises(SystemExit, match="GEMMA3_FAST_MARCH=no-such-cpu.*rejects -march=no-such-cpu"):
        setup_py.cpu_target_flags(setup_py.compiler())


def _copy_tree(dst: Path) -> None:
    shutil.copy(REPO / "setup.py", dst / "setup.py")
    shutil.copytree(REPO / "csrc", dst / "csrc")
    shutil.copytree(REPO / "gemma3_fast", dst / "gemma3_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "_C_build_error.txt", "__pycache__"))


def _failing_build(tree: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CXX=str(REJECTING_CXX), REJECT_SOURCES="*/csrc/*.cpp",
               REAL_CXX=os.environ.get("CXX", "c++"), **extra_env)
    env.pop("GEMMA3_FAST_MARCH", None)
    return subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_failed_build_installs_without_the_extension_and_says_why(tmp_path):
    _copy_tree(tmp_path)
    build = _failing_build(tmp_path)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "the C++ extension did not build" in build.stdout
    assert not list((tmp_path / "gemma3_fast").glob("_C*.so"))
    note = (tmp_path / "gemma3_fast" / "_C_build_error.txt").read_text()
    assert "Error compiling objects" in note and "rejecting_cxx.sh" in note

    # The copy's package (first on sys.path) imports, warns with the build's reason, and runs on the reference.
    check = (
        "import sys, warnings, torch\n"
        # An editable install's finder would hand this package the checkout's own _C: leave it out.
        "sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith('__editable__')]\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    from gemma3_fast import ops\n"
        "assert ops.__file__.startswith(%r), ops.__file__\n"
        "assert not ops.EXTENSION_AVAILABLE\n"
        "message = ' '.join(str(w.message) for w in caught)\n"
        "assert 'the install could not build it' in message and 'Error compiling objects' in message, message\n"
        "kernels = ops.resolve_backend('auto', 'cpu')\n"
        "assert kernels.name == 'reference'\n"
        "x, w = torch.randn(3, 8), torch.randn(8)\n"
        "torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ops.reference_ops.rms_norm(x, w, 1e-6))\n"
    ) % str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GEMMA3_FAST_DISABLE_EXTENSION"}
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr


def test_a_failed_build_is_an_error_when_the_extension_is_required(tmp_path):
    _copy_tree(tmp_path)
    build = _failing_build(tmp_path, GEMMA3_FAST_REQUIRE_EXTENSION="1")
    assert build.returncode != 0
    assert "rejecting_cxx: error: refusing to compile" in build.stdout + build.stderr
    assert not (tmp_path / "gemma3_fast" / "_C_build_error.txt").exists()
