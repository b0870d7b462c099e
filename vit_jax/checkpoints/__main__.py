"""python -m vit_jax.checkpoints info PATH

PATH is a workdir, its checkpoints/ directory or one step directory. Prints the run's config, then
`step: <n>`, `params: <count>` and `sha256: <hex>` (a digest of the parameters that does not depend on
how the run was sharded), and how the run was trained (its objective; for a run that froze a
pretrained backbone, the model reassembled from the recorded file). Exits non-zero with a message on a missing or unreadable checkpoint.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

from vit_jax import cli
from vit_jax.checkpoints.manager import CheckpointError, load_params, params_digest
from vit_jax.models import params as params_lib


def info(path: str) -> str:
  params, meta = load_params(path)
  lines = ['config:', json.dumps(meta.get('config', {}), indent=2, sort_keys=True)]
  if meta.get('class_names'):
    lines.append(f'classes: {len(meta["class_names"])} ({", ".join(meta["class_names"][:10])}'
                 f'{", ..." if len(meta["class_names"]) > 10 else ""})')
  lines += [f'step: {meta["step"]}', f'params: {params_lib.count(params)}',
            f'sha256: {params_digest(params)}']
  if meta.get('objective'):
    from vit_jax import objectives  # pylint: disable=import-outside-toplevel
    cls, objective = objectives.of_meta(meta)
    lines += cls.describe(objective)
    own = params.get(objectives.OBJECTIVE_KEY)
    if own:
      lines.append(f'objective parameters: {params_lib.count(own)} '
                   f'({", ".join(sorted(params_lib.flatten(own)))})')
    if objective.get('frozen_from'):  # reassembled as `predict` does, the frozen part checked
      from vit_jax.checkpoints.readers import read_checkpoint  # pylint: disable=import-outside-toplevel
      ckpt = read_checkpoint(path)
      total = params_lib.count(ckpt.params)
      trained = params_lib.count(params) - params_lib.count(own or {})
      lines.append(f'model: {total} parameters, {trained} trained in this run and '
                   f'{total - trained} frozen (read back from {objective["frozen_from"]["path"]}, '
                   'sha256 matches)')
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = cli.parser('vit_jax.checkpoints', __doc__)
  p.add_argument('command', choices=['info'])
  p.add_argument('path', help='a workdir, its checkpoints/ directory or one step directory')
  args = p.parse_args(argv)

  def body() -> int:
    try:
      print(info(args.path))
    except CheckpointError as e:
      raise ValueError(str(e)) from e
    return 0
  return cli.run(body)


if __name__ == '__main__':
  cli.main_entry(main)
