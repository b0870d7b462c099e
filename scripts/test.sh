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
PY="$VENV/bin/python"
WORKERS="${VIT_JAX_TEST_WORKERS:-2}"

if [ "${1:-}" = --fast ]; then
  shift
  exec "$PY" -m pytest -n "$WORKERS" -m "not slow" "$@"
fi
if [ $# -gt 0 ]; then
  exec "$PY" -m pytest "$@"
fi
"$PY" -m pytest -n "$WORKERS" -m "not slow"
# Long checks: run one at a time, since each one is itself parallel or timed against a budget.
"$PY" -m pytest -m slow || { rc=$?; [ $rc = 5 ] || exit $rc; }  # 5: none collected
