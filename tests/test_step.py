"""The train step: gradient accumulation averages the micro-batches' gradients (and equals one big
batch); losses; eval sums with masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.numerics import assert_close_to_scale, assert_trees_close_to_scale
from vit_jax.families import registry
from vit_jax import sharding as sharding_lib
from vit_jax.families.registry import create_model
from vit_jax.objectives import classify, registry as objectives
from vit_jax.train import optim, state as state_lib, step as step_lib

SMOOTHED = objectives.from_keywords(label_smoothing=0.1)  # classification, labels smoothed by 0.1


def _setup(accum, ema=None, num_classes=5):
  model = create_model(registry.get_model_config('ViT-testing'), num_classes, head_zeroinit=False)
  sched = optim.make_schedule(1e-3, 100, 2)
  tx = optim.make_optimizer(dict(optimizer='adam', weight_decay=0.1, grad_clip_norm=1.0), sched)
  mesh = sharding_lib.make_mesh((('data', -1),))
  state, shardings = state_lib.create_train_state(model, tx, (1, 8, 8, 3), 0, mesh,
                                                  use_ema=ema is not None)
  step = step_lib.make_train_step(model, tx, sched, mesh, shardings, accum_steps=accum,
                                  objective=SMOOTHED, ema_decay=ema)
  return model, state, step, mesh, shardings


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {'image': jnp.asarray(rng.uniform(-1, 1, (n, 8, 8, 3)), jnp.float32),
          'labels': jax.nn.one_hot(rng.randint(0, 5, n), 5)}


def _gradient_recorder() -> optax.GradientTransformation:
  """An 'optimizer' whose state is the last gradient it was given and whose update is zero: the
  test reads back exactly the gradient the step computed, with no update arithmetic in between."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


class _ShapeRecorder:
  """Stands in for a Flax module in `make_train_step`: records the image shape of every `apply`
  (at trace time, where shapes are static) and delegates to the module."""

  def __init__(self, model):
    self.model, self.shapes = model, []

  def apply(self, variables, images, **kwargs):
    self.shapes.append(tuple(images.shape))
    return self.model.apply(variables, images, **kwargs)


def test_accumulation_equals_one_big_batch():
  """Without dropout, the mean of four micro-batch gradients is the gradient of the batch mean."""
  grads, losses = {}, {}
  for k in (1, 4):
    model = create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False)
    mesh = sharding_lib.make_mesh((('data', -1),))
    tx = _gradient_recorder()
    state, shardings = state_lib.create_train_state(model, tx, (1, 8, 8, 3), 0, mesh)
    step = step_lib.make_train_step(model, tx, optim.make_schedule(1e-3, 10, 0), mesh, shardings,
                                    accum_steps=k, objective=SMOOTHED)
    state, m = step(state, _batch(seed=1))
    grads[k], losses[k] = jax.device_get(state.opt_state), float(m['loss'])
  # Only the summation order differs (four partial means of 4 rows, or one of 16): ~sqrt(n) x eps
  # = 8e-6 for n ~ 4e3 terms per leaf; measured 1.4e-6 of the tree's scale (~4.6).
  assert_trees_close_to_scale(grads[4], grads[1], rtol=1e-5)
  assert_close_to_scale(losses[4], losses[1], rtol=1e-6, what='loss')
  assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[1])) > 0.1   # not all zero


def test_accumulation_averages_micro_batch_gradients_with_dropout():
  """accum_steps=4 on a batch of 16: the model sees [4, ...] micro-batches, each with its own
  dropout key, and the step's gradient is the mean of the four micro-batch gradients computed by
  hand. With dropout on, a step that ignored accumulation (one pass over 16 rows, one key) or used
  one micro-batch four times gives a different gradient."""
  model = create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False,
                       dropout_rate=0.2)
  tx = _gradient_recorder()
  mesh = sharding_lib.make_mesh((('data', -1),))
  state, shardings = state_lib.create_train_state(model, tx, (1, 8, 8, 3), 0, mesh)
  params, rng = jax.device_get((state.params, state.rng))   # the step donates `state`
  recorder = _ShapeRecorder(model)
  step = step_lib.make_train_step(recorder, tx, optim.make_schedule(1e-3, 10, 0), mesh, shardings,
                                  accum_steps=4, objective=SMOOTHED)
  batch = _batch(16)
  state, metrics = step(state, batch)
  assert recorder.shapes == [(4, 8, 8, 3)], recorder.shapes

  # By hand, following step.py: the step's key is fold_in(rng, step); micro-batch j holds rows
  # j, j+4, j+8, j+12 and draws dropout from fold_in(step key, j).
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), 0)
  targets = classify.smooth_labels(batch['labels'], 0.1)

  @jax.jit
  def micro(p, images, labels, k):
    f = lambda p: classify.loss_fn(model.apply({'params': p}, images, train=True,
                                               rngs={'dropout': k}), labels)
    return jax.value_and_grad(f)(p)

  hand = [micro(params, batch['image'][j::4], targets[j::4], jax.random.fold_in(key, j))
          for j in range(4)]
  want_grads = jax.tree.map(lambda *g: sum(np.float64(x) for x in g) / 4, *(g for _, g in hand))
  want_loss = np.mean([float(l) for l, _ in hand])
  # Same float32 arithmetic in another order (a scan vs four calls): a gradient leaf sums up to
  # 4 rows x 17 tokens x 64 units, ~4e3 x eps = 5e-4 of the scale in the worst case, ~sqrt(4e3) x eps
  # = 8e-6 for random rounding; measured 6e-8 of the tree's scale (~4). 1e-5 is far below what a
  # different dropout mask moves (~100% of the scale, checked below).
  assert_trees_close_to_scale(jax.device_get(state.opt_state), want_grads, rtol=1e-5)
  assert_close_to_scale(metrics['loss'], want_loss, rtol=1e-6, what='loss')
  assert_close_to_scale(metrics['grad_norm'], optax.global_norm(want_grads), rtol=1e-5)
  # The comparison can tell masks apart: the same four micro-batches with one key for all differ.
  same_key = [micro(params, batch['image'][j::4], targets[j::4], key)[1] for j in range(4)]
  other = jax.tree.map(lambda *g: sum(np.float64(x) for x in g) / 4, *same_key)
  with pytest.raises(AssertionError):
    assert_trees_close_to_scale(other, want_grads, rtol=1e-2)


def test_step_metrics_and_ema():
  _, state, step, _, _ = _setup(1, ema=0.5)
  p0 = jax.device_get(state.params)
  state, m = step(state, _batch())
  assert set(m) == {'loss', 'grad_norm', 'lr'}
  assert int(state.step) == 1 and float(m['grad_norm']) > 0
  np.testing.assert_allclose(m['lr'], 5e-4, rtol=1e-6)     # step 0 of a 2-step warm-up
  # ema = 0.5 * p0 + 0.5 * p1: one multiply-add per element, so within a few ulps of the tree's scale.
  want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, p0, jax.device_get(state.params))
  assert_trees_close_to_scale(jax.device_get(state.ema_params), want, rtol=1e-6)
  # And the EMA is not simply the new parameters (Adam moved every one by ~lr).
  assert not np.allclose(state.ema_params['head']['kernel'], state.params['head']['kernel'],
                         rtol=0, atol=1e-5)


def test_losses():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[0.0, 1.0, 0.0]])
  p = jax.nn.softmax(logits)[0]
  np.testing.assert_allclose(classify.loss_fn(logits, labels), -np.log(p[1]), rtol=1e-6)
  smooth = classify.smooth_labels(labels, 0.3)
  np.testing.assert_allclose(smooth, [[0.1, 0.8, 0.1]], rtol=1e-6)
  sig = classify.loss_fn(logits, labels, 'sigmoid_xent')
  want = np.log1p(np.exp(2.0)) + np.log1p(np.exp(-0.0)) + np.log1p(np.exp(-1.0))
  np.testing.assert_allclose(sig, want, rtol=1e-6)
  with pytest.raises(ValueError, match='not one of'):
    classify.loss_fn(logits, labels, 'hinge')


def test_eval_step_masks_padding():
  # 10 classes, so that a label can lie outside the top 5 (with 5 classes top-5 is always right).
  model, state, _, mesh, shardings = _setup(1, num_classes=10)
  ev = step_lib.make_eval_step(model, mesh, shardings.params)
  b = _batch(8)
  logits = np.asarray(model.apply({'params': state.params}, b['image']))
  order = np.argsort(-logits, axis=-1)       # classes by decreasing logit, per example
  labels = order[:, 0].copy()                # right at top-1 ...
  labels[:2] = order[:2, 1]                  # ... two wrong at top-1, right at top-5 (2nd best)
  labels[2] = order[2, 9]                    # one wrong at top-5 too (the worst class)
  labels[7] = order[7, 1]                    # the last two are padding and must not count: one
                                             # right at top-1, one right at top-5 only
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)
  out = ev(state.params, {'image': b['image'], 'label': jnp.asarray(labels, jnp.int32),
                          'mask': jnp.asarray(mask)})
  assert float(out['count']) == 6
  assert float(out['top1']) == 3
  assert float(out['top5']) == 5
  nll = -jax.nn.log_softmax(logits)[np.arange(8), labels]
  assert_close_to_scale(out['loss'], nll[:6].sum(), rtol=1e-6, what='eval loss')
