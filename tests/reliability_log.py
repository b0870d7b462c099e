"""Outcomes of the reliability tests, for `scripts/reliability.sh`'s summary.

When the environment names a file in VIT_JAX_RELIABILITY_LOG, `record` appends one JSON line
{"category", "case", "outcome"} to it (O_APPEND: safe from several pytest workers); otherwise it
does nothing. Categories used by the fault tests: 'fault' (outcome 'survived' or 'lost') and
'resume' ('bitwise' or 'differs'); the hostile-input tests add their own.
"""
from __future__ import annotations

import json
import os

ENV = 'VIT_JAX_RELIABILITY_LOG'


def record(category: str, case: str, outcome: str, **extra) -> None:
  path = os.environ.get(ENV)
  if not path:
    return
  line = json.dumps({'category': category, 'case': case, 'outcome': outcome, **extra})
  with open(path, 'a', encoding='utf-8') as f:
    f.write(line + '\n')
