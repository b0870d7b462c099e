#!/usr/bin/env bash
# Runs the test suite in .venv (created or refreshed first). Extra arguments go to pytest.
#   scripts/test.sh            fast tests, then the `slow` ones (long end-to-end checks)
#   scripts/test.sh --fast     fast tests only
#   scripts/test.sh tests/test_vit.py -k scan
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
ensure_venv dev
ensure_fashion_mnist || echo ">> Fashion-MNIST tests will be skipped" >&2

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# tests/interop.py: under this script a missing torch, timm, transformers or the torchvision
# stand-in fails the interop tests instead of skipping them.
export VIT_JAX_REQUIRE_INTEROP="${VIT_JAX_REQUIRE_INTEROP:-1}"
# One persistent XLA compilation cache for the whole run (both pytest workers and every subprocess
# they start): many tests and restarted runs compile the same tiny programs (-17% wall time on the
# trainer's tests). A fresh directory each run, removed at the end, so nothing stale is ever read;
# set JAX_COMPILATION_CACHE_DIR yourself to keep one, or to '' to compile everything.
if [ -z "${JAX_COMPILATION_CACHE_DIR+set}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t vit_jax_tests_xla.XXXXXX)
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
# Cache every program: the tests' are tiny (the defaults skip those compiled in under a second).
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
PY="$VENV/bin/python"
WORKERS="${VIT_JAX_TEST_WORKERS:-2}"

if [ "${1:-}" = --fast ]; then
  shift
  "$PY" -m pytest -n "$WORKERS" -m "not slow" "$@"
elif [ $# -gt 0 ]; then
  "$PY" -m pytest "$@"
else
  "$PY" -m pytest -n "$WORKERS" -m "not slow"
  # Long checks after the fast ones pass, also two at a time (6m46s -> 5m40s here); the one timed
  # bound among them, a lost process's peer exiting within heartbeat + 30 s, has room for the load.
  "$PY" -m pytest -n "$WORKERS" -m slow || { rc=$?; [ $rc = 5 ] || exit $rc; }  # 5: none collected
fi
