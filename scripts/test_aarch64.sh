#!/usr/bin/env bash
# Builds gemma3_fast's kernels for linux/aarch64 and runs the kernel tests there, under user-mode emulation, on an
# x86-64 Debian or Ubuntu machine with no ARM hardware. Slow (about 10 minutes, most of it the emulated tests), so
# not part of CI. Usage, from anywhere in the checkout:
#
#   scripts/test_aarch64.sh                   # build with -march=armv8-a (NEON), run the kernel tests
#   scripts/test_aarch64.sh -k linear -x      # arguments go to pytest
#
# What it uses, all cached under $GEMMA3_FAST_AARCH64_CACHE (default ~/.cache/gemma3_fast/aarch64):
#   - Debian's qemu-user-static, g++-aarch64-linux-gnu, debootstrap and ninja-build (installed with apt-get when
#     missing and this runs as root; otherwise it names them and stops);
#   - an arm64 Debian root file system with Python and libgomp ($SUITE, default bookworm: Python 3.11).
#     debootstrap --foreign only downloads and unpacks it; nothing in it runs but Python, via qemu-aarch64-static -L;
#   - torch's aarch64 CPU wheel ($TORCH_AARCH64, default 2.9.1: the newest aarch64 wheel on PyPI without CUDA)
#     and the tests' pure-Python dependencies, from PyPI into a folder on the emulated Python's path.
# The emulated Python runs setup.py as pip would; the compiler it calls (CXX) is the x86-64 cross compiler, which
# the kernel runs natively. Speed under emulation says nothing about an ARM CPU: this checks correctness only.
set -euo pipefail

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cache=${GEMMA3_FAST_AARCH64_CACHE:-$HOME/.cache/gemma3_fast/aarch64}
suite=${SUITE:-bookworm}
torch_version=${TORCH_AARCH64:-2.9.1}
march=${GEMMA3_FAST_MARCH:-armv8-a}
started=$(date +%s)
say() { echo "test_aarch64: $*" >&2; }

if [ "$(uname -m)" = aarch64 ]; then
  say "this machine is aarch64: install and test natively (README, Install), no emulation needed"; exit 2
fi

# Tools from Debian's packages.
missing=()
for tool in qemu-aarch64-static:qemu-user-static aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
            debootstrap:debootstrap ninja:ninja-build dpkg-deb:dpkg; do
  command -v "${tool%%:*}" > /dev/null || missing+=("${tool##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
    say "installing ${missing[*]}"
    apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
  else
    say "needs the Debian/Ubuntu packages: ${missing[*]} (sudo apt-get install ${missing[*]})"; exit 2
  fi
fi

# An arm64 root file system with Python and its headers, unpacked (not configured: nothing in it runs at install).
root=$cache/$suite-arm64
py=python3.11
[ "$suite" = bookworm ] || py=${PYTHON_AARCH64:?set PYTHON_AARCH64 (e.g. python3.13) for SUITE=$suite}
if [ ! -x "$root/usr/bin/$py" ]; then
  # The Debian mirror this machine's apt uses, unless DEBIAN_MIRROR says otherwise.
  sources=()
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] && sources+=("$f")
  done
  mirror=${DEBIAN_MIRROR:-$(awk '($1 == "URIs:" || $1 == "deb") && !/security/ {
    for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "${sources[@]}" /dev/null)}
  [ -n "$mirror" ] || { say "no Debian mirror found in /etc/apt: set DEBIAN_MIRROR"; exit 2; }
  say "arm64 $suite root file system into $root (once; from the Debian mirror apt uses here, or DEBIAN_MIRROR)"
  rm -rf "$root.partial" && mkdir -p "$cache"
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$py,lib$py-dev,libgomp1" "$suite" "$root.partial" \
    "$mirror" > "$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log"; exit 1; }
  for deb in "$root.partial"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$root.partial"; done
  mv "$root.partial" "$root"
fi

# torch for aarch64 and what the tests import, for the emulated Python (pip resolves for this machine's
# platform, so the wheels are named one by one, without their dependencies).
site=$cache/site-torch$torch_version
if [ ! -d "$site/torch" ]; then
  say "torch $torch_version (aarch64) and the test dependencies into $site (once)"
  rm -rf "$site.partial"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-deps --target "$site.partial" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --platform linux_aarch64 \
    --python-version "${py#python}" --implementation cp --only-binary=:all: "torch==$torch_version" \
    numpy pytest iniconfig packaging pluggy pygments filelock typing-extensions sympy mpmath networkx jinja2 markupsafe \
    fsspec setuptools wheel safetensors tokenizers huggingface-hub pyyaml tqdm gguf requests \
    2> "$cache/pip.log" || { grep -v "WARNING: Location" "$cache/pip.log" | tail -20; exit 1; }
  mv "$site.partial" "$site"
fi

# Python.h from the root file system. Debian's pyconfig.h includes <aarch64-linux-gnu/python3.X/pyconfig.h>, so
# that one directory is given on its own (all of $root/usr/include would shadow the cross compiler's libc).
inc=$cache/include
mkdir -p "$inc/aarch64-linux-gnu"
ln -sfn "$root/usr/include/aarch64-linux-gnu/$py" "$inc/aarch64-linux-gnu/$py"

# A copy of the working tree (tracked and new files), so the host's own build is left alone. It stays in the cache
# until the next run, with the aarch64 build, for a closer look.
work=$cache/work
rm -rf "$work" && mkdir -p "$work"
git -C "$repo" ls-files -co --exclude-standard -z | (cd "$repo" && xargs -0 tar -cf - --no-recursion) |
  tar -xf - -C "$work"
rm -f "$work"/gemma3_fast/_C*.so "$work"/gemma3_fast/_C_build_error.txt

emulated() {
  env CXX=aarch64-linux-gnu-g++ CC=aarch64-linux-gnu-gcc LDSHARED="aarch64-linux-gnu-g++ -shared" \
    CPATH="$inc:$root/usr/include/$py" PYTHONPATH="$site" PYTHONDONTWRITEBYTECODE=1 \
    qemu-aarch64-static -L "$root" "$root/usr/bin/$py" "$@"
}

cd "$work"
say "building for aarch64 (-march=$march), torch $torch_version"
build_started=$(date +%s)
GEMMA3_FAST_MARCH=$march GEMMA3_FAST_REQUIRE_EXTENSION=1 MAX_JOBS=$(nproc) \
  emulated setup.py build_ext --inplace > build.log 2>&1 ||
  { grep -E "error|gemma3_fast:" build.log | head -40; exit 1; }
grep "^gemma3_fast:" build.log >&2 || true
say "built in $(( $(date +%s) - build_started )) s"
emulated -c "
import platform, gemma3_fast._C as c
assert c.SIMD == 'neon', f'expected the NEON paths, this build has {c.SIMD!r}'
print(f'test_aarch64: {platform.machine()} build, SIMD={c.SIMD}, OpenMP={c.OPENMP}')"

tests_started=$(date +%s)
emulated -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernels.py tests/test_training_ops.py tests/test_gguf_native.py \
  tests/test_batched.py "$@"
say "tests took $(( $(date +%s) - tests_started )) s; all in $(( $(date +%s) - started )) s"
