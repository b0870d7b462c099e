#!/usr/bin/env bash
# The README's first command. Sets up .venv (and Debian's Fashion-MNIST) if needed, then runs the
# default job. Until the trainer lands (issue C) the job builds ViT-B/16, prints its summary and runs
# one forward pass on a real Fashion-MNIST batch resized to 224x224.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
ensure_venv
ensure_fashion_mnist
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" scripts/forward_demo.py --data_dir "$FASHION_MNIST_DIR"
