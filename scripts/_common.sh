# Shared set-up for scripts/quickstart.sh and scripts/test.sh. Source it from the repository root.
# ensure_venv [dev]: (re)creates .venv when it is missing or when the requirement files changed.
# ensure_fashion_mnist: installs Debian's dataset-fashion-mnist when it is absent and we may.

VENV="${VIT_JAX_VENV:-.venv}"
PYTHON_BIN="${PYTHON:-python3}"
FASHION_MNIST_DIR="${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"

ensure_venv() {
  local files="requirements.txt"
  [ "${1:-}" = dev ] && files="requirements.txt requirements-dev.txt"
  local want have=""
  want=$(cat $files | sha256sum | cut -d' ' -f1)
  [ -f "$VENV/.requirements.sha256" ] && have=$(cat "$VENV/.requirements.sha256")
  # A dev venv also satisfies the runtime requirements; only re-install when something is missing.
  if [ -x "$VENV/bin/python" ] && { [ "$have" = "$want" ] || grep -qx "$want" "$VENV/.satisfies" 2>/dev/null; }; then
    return 0
  fi
  echo ">> setting up $VENV (requirements: $files)" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON_BIN" -m venv "$VENV" || return 1
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2 || return 1
  local args=""
  for f in $files; do args="$args -r $f"; done
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $args >&2 || return 1
  if [ -f requirements-nodeps.txt ] && [ "${1:-}" = dev ]; then
    # Packages whose declared dependencies would pull in a CUDA torch or a torchvision build that
    # cannot load here: installed without their dependencies (see the file's comment).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt >&2 || return 1
  fi
  echo "$want" > "$VENV/.requirements.sha256"
  cat requirements.txt | sha256sum | cut -d' ' -f1 >> "$VENV/.satisfies"
  echo "$want" >> "$VENV/.satisfies"
}

ensure_fashion_mnist() {
  [ -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo ">> installing Debian's dataset-fashion-mnist into $FASHION_MNIST_DIR" >&2
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; })
  fi
  if [ ! -f "$FASHION_MNIST_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST is not in $FASHION_MNIST_DIR. Install it with" >&2
    echo "  sudo apt-get install dataset-fashion-mnist" >&2
    echo "or put the four idx .gz files in a folder and set FASHION_MNIST_DIR to it." >&2
    return 1
  fi
}
