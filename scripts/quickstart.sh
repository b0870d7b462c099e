#!/usr/bin/env bash
# The README's first command: scripts/quickstart.sh [OUT]   (default OUT=runs/quickstart)
#
# Sets up .venv and Debian's Fashion-MNIST if needed, then
#   1. trains a small ViT from scratch on Fashion-MNIST (28x28) with the pre-training recipe, in
#      OUT/fashion_mnist, and evaluates it on the 10,000 test images;
#   2. fine-tunes that model on scikit-learn's digits upsampled to 42x42 (new head, new patch grid,
#      new dataset) in OUT/digits_finetune, and trains the same model from scratch on digits with the
#      same budget in OUT/digits_scratch: the transfer gain, measured.
# Running it again resumes (or, when finished, just reports) each stage.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/quickstart}"
source scripts/_common.sh
ensure_venv
ensure_fashion_mnist
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
PY="$VENV/bin/python"

stage() {  # stage NAME CONFIG [overrides...]: trains (or resumes) OUT/NAME, prints its result line
  local name=$1; shift
  echo ">> $name" >&2
  "$PY" -m vit_jax.main --workdir="$OUT/$name" --config="$@" 2>&1 >"$OUT/$name.out" |
    grep -v -E '^[IW][0-9]{4} |^WARNING:absl' >&2 || true
  grep '^result: ' "$OUT/$name.out" | tail -n 1 | cut -c9-
}

mkdir -p "$OUT"
start=$(date +%s)
fm=$(stage fashion_mnist configs/quickstart.py)
fm_done=$(date +%s)
ft=$(stage digits_finetune "configs/quickstart_digits.py:pretrained=$OUT/fashion_mnist")
sc=$(stage digits_scratch configs/quickstart_digits.py)
end=$(date +%s)

"$PY" - "$OUT" "$fm" "$ft" "$sc" "$((fm_done - start))" "$((end - start))" <<'PY'
import json, sys
out, fm, ft, sc, t_fm, t_all = sys.argv[1:]
fm, ft, sc = (json.loads(x) if x else {} for x in (fm, ft, sc))
pct = lambda r: f"{100 * r['eval_top1']:.2f}%" if 'eval_top1' in r else 'n/a (see the .out file)'
print()
print(f'Fashion-MNIST test accuracy: {pct(fm)}  ({fm.get("eval_count", "?")} images, '
      f'{int(t_fm) // 60}m{int(t_fm) % 60:02d}s)')
print(f'digits test accuracy, fine-tuned from Fashion-MNIST: {pct(ft)}')
print(f'digits test accuracy, same model from scratch:       {pct(sc)}')
if 'eval_top1' in ft and 'eval_top1' in sc:
  print(f'transfer gain: {100 * (ft["eval_top1"] - sc["eval_top1"]):+.2f} points')
print(f'total time: {int(t_all) // 60}m{int(t_all) % 60:02d}s')
print()
for name in ('fashion_mnist', 'digits_finetune', 'digits_scratch'):
  print(f'{name}: checkpoints {out}/{name}/checkpoints, metrics {out}/{name}/metrics.jsonl, '
        f'TensorBoard: tensorboard --logdir {out}/{name}/tensorboard')
PY
