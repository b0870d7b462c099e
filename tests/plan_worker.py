"""Plans a tiny config on 8 fake CPU devices and starts the real trainer on it; writes what
tests/test_plan.py compares. Run as a subprocess (the device count is fixed before JAX starts):

  python tests/plan_worker.py OUT.json --config.key=value ...

The trainer (`vit_jax.train.loop.train_and_evaluate`) runs up to its first train step: there the
step function it built is lowered for the live state and batch it is about to run on, the live
state's bytes on every device are summed from its arrays' addressable shards, and the run stops.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Stop(Exception):
  pass


def live_bytes(tree) -> dict[str, int]:
  """{device id: bytes of that device's shards} over a tree of live arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  out: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      key = str(shard.device.id)
      out[key] = out.get(key, 0) + shard.data.nbytes
  return out


def main(out_path: str, overrides: list[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.plan import __main__ as plan_cli  # pylint: disable=g-import-not-at-top
  from vit_jax.plan import core, topologies  # pylint: disable=g-import-not-at-top
  from vit_jax.train import loop, step as step_lib  # pylint: disable=g-import-not-at-top

  config = plan_cli.load_config(['--config=configs/quickstart.py', *overrides])
  plan = core.make_plan(config, topologies.parse('cpu:8'))
  record = {'plan': {'parameters': plan.memory['parameters'], 'optimizer': plan.memory['optimizer'],
                     'ema': plan.memory['ema'], 'fingerprint': plan.fingerprint,
                     'arguments': plan.memory['arguments'], 'fits': plan.fits}}

  real = step_lib.make_train_step

  def recording(*args, **kwargs):
    fn = real(*args, **kwargs)

    def first_step(state, batch):
      text = fn.lower(state, batch).as_text()
      record['trainer'] = {'fingerprint': hashlib.sha256(text.encode()).hexdigest()[:16],
                           'parameters': live_bytes(state.params),
                           'optimizer': live_bytes(state.opt_state),
                           'ema': live_bytes(state.ema_params),
                           'global_parameters': sum(a.nbytes for a in jax.tree.leaves(state.params)),
                           'devices': len(jax.devices())}
      raise _Stop
    return first_step

  step_lib.make_train_step = recording
  with tempfile.TemporaryDirectory() as workdir:
    try:
      loop.train_and_evaluate(config, workdir)
    except _Stop:
      pass
  with open(out_path, 'w') as f:
    json.dump(record, f, indent=1)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
