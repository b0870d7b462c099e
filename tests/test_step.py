"""The train step: gradient accumulation equals one big batch; losses; eval sums with masks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.families import registry
from vit_jax import sharding as sharding_lib
from vit_jax.families.registry import create_model
from vit_jax.train import optim, state as state_lib, step as step_lib


def _setup(accum, ema=None, dropout=0.0, optimizer='adam'):
  model = create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False,
                       dropout_rate=dropout)
  sched = optim.make_schedule(1e-3, 100, 2)
  opt = (dict(optimizer='adam', weight_decay=0.1, grad_clip_norm=1.0) if optimizer == 'adam' else
         dict(optimizer='sgd', momentum=0.9, grad_clip_norm=1.0))
  tx = optim.make_optimizer(opt, sched)
  mesh = sharding_lib.make_mesh((('data', -1),))
  state, shardings = state_lib.create_train_state(model, tx, (1, 8, 8, 3), 0, mesh,
                                                  use_ema=ema is not None)
  step = step_lib.make_train_step(model, tx, sched, mesh, shardings, accum_steps=accum,
                                  label_smoothing=0.1, ema_decay=ema)
  return model, state, step, mesh, shardings


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {'image': jnp.asarray(rng.uniform(-1, 1, (n, 8, 8, 3)), jnp.float32),
          'labels': jax.nn.one_hot(rng.randint(0, 5, n), 5)}


def test_accumulation_equals_one_big_batch():
  # SGD, whose update is linear in the gradient: Adam's g / sqrt(g^2) would turn float32 rounding
  # of near-zero gradients into full-size updates and hide what is being compared.
  results = {}
  for k in (1, 4):
    _, state, step, _, _ = _setup(k, optimizer='sgd', dropout=0.0)
    losses = []
    for i in range(3):
      state, m = step(state, _batch(seed=i))
      losses.append(float(m['loss']))
    results[k] = (np.array(losses), jax.device_get(state.params))
  np.testing.assert_allclose(results[1][0], results[4][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               results[1][1], results[4][1])
  # Different micro-batches really were used: a 4-way split of a different batch differs.
  assert not np.allclose(results[1][0][0], results[1][0][1])


def test_step_metrics_and_ema():
  _, state, step, _, _ = _setup(1, ema=0.5)
  p0 = jax.device_get(state.params)
  state, m = step(state, _batch())
  assert set(m) == {'loss', 'grad_norm', 'lr'}
  assert int(state.step) == 1 and float(m['grad_norm']) > 0
  np.testing.assert_allclose(m['lr'], 5e-4, rtol=1e-6)     # step 0 of a 2-step warm-up
  # ema = 0.5 * p0 + 0.5 * p1
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p0, jax.device_get(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               jax.device_get(state.ema_params), want)


def test_losses():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[0.0, 1.0, 0.0]])
  p = jax.nn.softmax(logits)[0]
  np.testing.assert_allclose(step_lib.loss_fn(logits, labels), -np.log(p[1]), rtol=1e-6)
  smooth = step_lib.smooth_labels(labels, 0.3)
  np.testing.assert_allclose(smooth, [[0.1, 0.8, 0.1]], rtol=1e-6)
  sig = step_lib.loss_fn(logits, labels, 'sigmoid_xent')
  want = np.log1p(np.exp(2.0)) + np.log1p(np.exp(-0.0)) + np.log1p(np.exp(-1.0))
  np.testing.assert_allclose(sig, want, rtol=1e-6)
  with pytest.raises(ValueError, match='not one of'):
    step_lib.loss_fn(logits, labels, 'hinge')


def test_eval_step_masks_padding():
  model, state, _, mesh, shardings = _setup(1)
  ev = step_lib.make_eval_step(model, mesh, shardings.params)
  b = _batch(8)
  logits = model.apply({'params': state.params}, b['image'])
  labels = np.array(jnp.argmax(logits, -1))
  labels[:2] = (labels[:2] + 1) % 5           # two wrong top-1 predictions
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)  # the last two are padding
  out = ev(state.params, {'image': b['image'], 'label': jnp.asarray(labels, jnp.int32),
                          'mask': jnp.asarray(mask)})
  assert float(out['count']) == 6
  assert float(out['top1']) == 4
  assert float(out['top5']) == 6
