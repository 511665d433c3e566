#!/usr/bin/env bash
# All set-up on a fresh machine: a virtual environment in .venv with the CUDA 13.0 build of
# torch 2.14.1 (from the machine's local package store; it lets the CUDA extension build even
# without a GPU), this project in editable mode with its extras, and the compiled extension
# built in place.
#
# Idempotent in cost as well as in effect. Two stamps, each a hash of what decides a step:
#   .venv/.ek-deps-stamp   setup.sh, pyproject.toml, the Python version: the pip installs.
#   .venv/.ek-build-stamp  setup.py, csrc/*, torch's version, the build's environment
#                          variables: the extension build.
# A step whose stamp matches is skipped, so a second run with nothing changed does nothing and
# says so in one line. When a source changed, the extension is rebuilt by torch's ninja build
# in the persistent build/ folder, which recompiles only the objects whose sources (or the
# headers they include, from the compilers' dependency files) changed, then relinks.
# A fresh clone has neither stamps nor build/, so it does everything (as CI always does).
#
#   bash scripts/setup.sh            only what changed
#   bash scripts/setup.sh --force    everything again: reinstall, and rebuild from scratch
set -euo pipefail
cd "$(dirname "$0")/.."
FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force) FORCE=1 ;;
        *) echo "setup.sh: unknown argument '$arg' (use --force for a full reinstall and rebuild)" >&2
           exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
VPY=.venv/bin/python
DEPS_STAMP=.venv/.ek-deps-stamp
BUILD_STAMP=.venv/.ek-build-stamp
EXTRAS="dev,plot,integrations"
BUILD_TEMP=build/ext

[ -x "$VPY" ] || "$PY" -m venv .venv
if [ "$FORCE" = 1 ]; then
    rm -rf "$BUILD_TEMP" "$DEPS_STAMP" "$BUILD_STAMP"
fi

hash_of() {  # sha256 over the named files (sorted, by name and content) and extra text on stdin
    { cat; for f in "$@"; do printf '%s\n' "$f"; cat "$f"; done; } | sha256sum | cut -d' ' -f1
}

deps_hash=$("$VPY" -c 'import sys; print(sys.version)' | hash_of scripts/setup.sh pyproject.toml)
did=""
if [ "$(cat "$DEPS_STAMP" 2>/dev/null)" != "$deps_hash" ]; then
    "$VPY" -m pip install -q --disable-pip-version-check setuptools wheel ninja "torch==2.14.1"
    # The package itself, editable, with no extension: the extension is built below, in place
    # and incrementally, instead of in pip's throw-away build folder. --no-build-isolation: the
    # build imports the torch installed above. "torch==2.14.1" again so no extra can move it.
    EMA_KERNELS_NO_EXT=1 "$VPY" -m pip install -q --disable-pip-version-check \
        --no-build-isolation -e ".[$EXTRAS]" "torch==2.14.1"
    rm -f "$BUILD_STAMP"  # a new torch or toolchain invalidates the build
    echo "$deps_hash" > "$DEPS_STAMP"
    did="dependencies"
fi

# Everything that decides what the extension build produces.
build_hash=$( { "$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))'
                env | grep -E '^(EMA_KERNELS_NO_EXT|EMA_KERNELS_NO_CUDA|EMA_KERNELS_FORCE_CUDA|EMA_KERNELS_VERBOSE_PTXAS|TORCH_CUDA_ARCH_LIST|CUDA_HOME|CXX|CC)=' | sort
                command -v nvcc || true; } | hash_of setup.py $(find csrc -type f | sort) )
built_ok() { [ "${EMA_KERNELS_NO_EXT:-}" = 1 ] || ls ema_kernels/_C.*.so ema_kernels/_C_emu.*.so >/dev/null 2>&1; }
if [ "$(cat "$BUILD_STAMP" 2>/dev/null)" != "$build_hash" ] || ! built_ok; then
    if [ "${EMA_KERNELS_NO_EXT:-}" = 1 ]; then
        rm -f ema_kernels/_C.*.so ema_kernels/_C_emu.*.so  # as asked: no extension
    fi
    # --force: setuptools would skip an extension whose .so is newer than its listed sources,
    # missing a changed header it does not list; ninja (in $BUILD_TEMP) decides what to redo.
    # The compiler lines go to build/ext/build.log; the build's own what-and-why lines are shown.
    mkdir -p "$BUILD_TEMP"
    if ! MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py -q build_ext --inplace --force \
            --build-temp "$BUILD_TEMP" > "$BUILD_TEMP/build.log" 2>&1; then
        tail -n 60 "$BUILD_TEMP/build.log" >&2
        echo "setup.sh: the extension build failed (whole log: $BUILD_TEMP/build.log)" >&2
        exit 1
    fi
    grep -E '^ema_kernels setup:|^\[[0-9]+/[0-9]+\] ' "$BUILD_TEMP/build.log" | sed -E 's/^(\[[0-9]+\/[0-9]+\]) .* -c (\S+) -o .*/\1 compiled \2/' || true
    echo "$build_hash" > "$BUILD_STAMP"
    did="${did:+$did and }extension"
fi

if [ -z "$did" ]; then
    echo "setup.sh: up to date (.venv and the extension match setup.sh, pyproject.toml, setup.py, csrc/ and torch $("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))')); nothing to do. --force rebuilds everything."
    exit 0
fi
# Say what was built and which backends work here (and why not).
"$VPY" -m ema_kernels info
