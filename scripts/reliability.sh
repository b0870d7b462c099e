#!/usr/bin/env bash
# The reliability suite and its figures: hostile inputs (tests/test_hostile*.py), faults during
# training (tests/test_faults.py: NaN gradients, a full disk, a lost process) and the SIGKILL soak
# (tests/test_train.py), fast and slow parts, in .venv (created or refreshed first). Each test
# appends {"category", "case", "outcome"} lines to $VIT_JAX_RELIABILITY_LOG
# (tests/reliability_log.py); the summary counts them. Last line: `reliability: N cases, L lost`.
# The exit status is non-zero when anything was lost (a fault not survived, a resume that differs)
# or a test failed.
#   scripts/reliability.sh               everything (about 6 min on 2 quiet cores)
#   scripts/reliability.sh -k disk_full  extra arguments go to pytest
# The disk-full tests mount a tmpfs: they need root (CI runs as root) and are skipped otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/_common.sh
ensure_venv dev || exit 1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="$VENV/bin/python"
WORKERS="${VIT_JAX_TEST_WORKERS:-2}"
OUT="$(mktemp -d "${TMPDIR:-/tmp}/vit_jax_reliability.XXXXXX")"
export VIT_JAX_RELIABILITY_LOG="$OUT/outcomes.jsonl"
: > "$VIT_JAX_RELIABILITY_LOG"

FILES=(tests/test_faults.py tests/test_hostile*.py)
SOAK=tests/test_train.py::test_sigkill_soak_in_steps_evaluation_and_saves_resumes_bitwise

status=0
# Fast parts in parallel; slow ones one at a time (each is itself parallel or timed).
"$PY" -m pytest -q -p no:cacheprovider -n "$WORKERS" -m "not slow" --junitxml="$OUT/fast.xml" \
  "${FILES[@]}" "$@" || status=$?
[ $status = 5 ] && status=0  # 5: nothing collected (e.g. -k matched only slow tests)
rc=0
"$PY" -m pytest -q -p no:cacheprovider -m slow --junitxml="$OUT/slow.xml" \
  "${FILES[@]}" "$SOAK" "$@" || rc=$?
[ $rc = 5 ] && rc=0
[ $rc != 0 ] && status=$rc

"$PY" - "$OUT" "$status" <<'EOF'
import collections, glob, json, os, sys
import xml.etree.ElementTree as ET

out, status = sys.argv[1], int(sys.argv[2])
rows = [json.loads(l) for l in open(os.path.join(out, 'outcomes.jsonl')) if l.strip()]
failed = skipped = 0
for path in glob.glob(os.path.join(out, '*.xml')):
  for suite in ET.parse(path).getroot().iter('testsuite'):
    failed += int(suite.get('failures', 0)) + int(suite.get('errors', 0))
    skipped += int(suite.get('skipped', 0))
BAD = {'lost', 'differs'}  # every other outcome is a correct read, a counted skip or a clear error

def line(rs):
  c = collections.Counter(r['outcome'] for r in rs)
  return ', '.join(f'{k} {v}' for k, v in sorted(c.items()))

inputs = [r for r in rows if r['category'] not in ('fault', 'resume')]
print('\n== reliability summary ==')
print(f'hostile inputs tried: {len(inputs)}')
for cat in sorted({r['category'] for r in inputs}):
  rs = [r for r in inputs if r['category'] == cat]
  print(f'  {cat:<12} {len(rs):>4}  ({line(rs)})')
faults = [r for r in rows if r['category'] == 'fault']
print(f'faults injected: {len(faults)}, survived {sum(r["outcome"] == "survived" for r in faults)}')
for case, n in sorted(collections.Counter(r['case'] for r in faults).items()):
  lost = sum(r['outcome'] != 'survived' for r in faults if r['case'] == case)
  print(f'  {case:<32} {n:>3}' + (f'  LOST {lost}' if lost else ''))
resumes = [r for r in rows if r['category'] == 'resume']
bitwise = sum(r['outcome'] == 'bitwise' for r in resumes)
print(f'resumes checked bitwise: {bitwise} of {len(resumes)}'
      + (f' ({", ".join(r["case"] for r in resumes)})' if resumes else ''))
lost = sum(r['outcome'] in BAD or (r['category'] == 'fault' and r['outcome'] != 'survived')
           for r in rows)
if failed or status:
  print(f'tests failed: {failed} (pytest exit {status}); see the output above')
if skipped:
  print(f'tests skipped: {skipped} (e.g. no tmpfs without root)')
print(f'outcomes, one JSON line per case: {os.path.join(out, "outcomes.jsonl")}')
print(f'reliability: {len(rows)} cases, {lost + failed} lost')
sys.exit(1 if lost or failed or status else 0)
EOF
