"""`python -m tests.main_probe ARGS...` runs `python -m vit_jax.main ARGS...` unchanged, except that
it records the image shape the model is applied to inside the train step (at trace time) and prints
`probe: train-step image shapes [...]` on stderr at exit: what a test cannot see from outside,
such as the micro-batch size under `--config.accum_steps`."""
from __future__ import annotations

import atexit
import runpy
import sys

from vit_jax.train import step as step_lib

SHAPES: list[tuple[int, ...]] = []


class _Recorder:
  """Delegates to the Flax module; records the image shape of each `apply`."""

  def __init__(self, model):
    self._model = model

  def apply(self, variables, images, *args, **kwargs):
    SHAPES.append(tuple(images.shape))
    return self._model.apply(variables, images, *args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._model, name)


_real = step_lib.make_train_step


def _make_train_step(model, *args, **kwargs):
  return _real(_Recorder(model), *args, **kwargs)


if __name__ == '__main__':
  step_lib.make_train_step = _make_train_step
  atexit.register(lambda: print(f'probe: train-step image shapes {sorted(set(SHAPES))}',
                                file=sys.stderr, flush=True))
  sys.argv = ['vit_jax.main', *sys.argv[1:]]
  runpy.run_module('vit_jax.main', run_name='__main__', alter_sys=True)
