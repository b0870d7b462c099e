"""python -m vit_jax.checkpoints info PATH

PATH is a workdir, its checkpoints/ directory or one step directory. Prints the run's config, then
`step: <n>`, `params: <count>` and `sha256: <hex>` (a digest of the parameters that does not depend on
how the run was sharded). Exits non-zero with a message on a missing or unreadable checkpoint.
"""
from __future__ import annotations

import json
import sys

from vit_jax.checkpoints.manager import CheckpointError, load_params, params_digest
from vit_jax.models import params as params_lib

USAGE = 'usage: python -m vit_jax.checkpoints info PATH'


def info(path: str) -> str:
  params, meta = load_params(path)
  lines = ['config:', json.dumps(meta.get('config', {}), indent=2, sort_keys=True)]
  if meta.get('class_names'):
    lines.append(f'classes: {len(meta["class_names"])} ({", ".join(meta["class_names"][:10])}'
                 f'{", ..." if len(meta["class_names"]) > 10 else ""})')
  lines += [f'step: {meta["step"]}', f'params: {params_lib.count(params)}',
            f'sha256: {params_digest(params)}']
  return '\n'.join(lines)


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] != 'info':
    print(USAGE, file=sys.stderr)
    return 2
  try:
    print(info(argv[1]))
  except CheckpointError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
