"""The ViT's fixed and random layers against their definitions: the 2-D sine-cosine position
embedding from its formula, and dropout, attention dropout and stochastic depth by their statistics
(rate, 1 / (1 - p) scaling, whole examples dropped), not by their shapes."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from vit_jax.families import registry
from vit_jax.families.registry import create_model
from vit_jax.models.attention import dot_product_attention
from vit_jax.models.vit import AddPositionEmbs, MlpBlock, drop_path, gelu, sincos_2d


def sincos_reference(h: int, w: int, d: int, temperature: float = 10_000.0) -> np.ndarray:
  """[h*w, d] from the definition (big_vision's posemb_sincos_2d), one element at a time: token
  m = y*w + x; channel c lies in quarter c // (d/4) with frequency index i = c % (d/4),
  omega_i = temperature^(-i / (d/4 - 1)); the quarters hold sin(x omega), cos(x omega),
  sin(y omega), cos(y omega)."""
  q = d // 4
  out = np.zeros((h * w, d))
  for y in range(h):
    for x in range(w):
      for c in range(d):
        omega = temperature ** (-(c % q) / (q - 1))
        pos, fn = ((x, math.sin), (x, math.cos), (y, math.sin), (y, math.cos))[c // q]
        out[y * w + x, c] = fn(pos * omega)
  return out


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
  """Whether `count` successes of `n` trials are within `sigmas` standard deviations of n p (a
  fixed seed makes the draw deterministic; 5 sigma would be a 6e-7 accident for a fresh seed)."""
  return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_sincos_2d_matches_its_definition():
  for h, w, d in ((3, 5, 16), (4, 4, 32)):
    got = sincos_2d(h, w, d)
    assert got.shape == (1, h * w, d) and got.dtype == np.float32
    # float64 values of size <= 1 stored as float32: off by at most half an ulp, 6e-8.
    assert_close_to_scale(got[0], sincos_reference(h, w, d), rtol=1e-7, what=f'sincos {h}x{w}x{d}')
  # The model adds it after zero rows for the prefix (class) tokens.
  tokens = jnp.zeros((2, 1 + 3 * 5, 16))
  out = AddPositionEmbs('sincos2d', (3, 5), 1).apply({}, tokens)
  np.testing.assert_array_equal(out[:, 0], 0)
  assert_close_to_scale(out[0, 1:], sincos_reference(3, 5, 16), rtol=1e-7, what='added')


def test_drop_path_drops_whole_examples_at_the_rate_and_rescales():
  n, rate = 4000, 0.25
  x = jnp.ones((n, 3, 5), jnp.float32)
  for fn in (drop_path, jax.jit(drop_path)):   # a Python float and a traced rate
    out = np.asarray(fn(x, rate, jax.random.PRNGKey(0))).reshape(n, -1)
    kept = out[:, 0] != 0
    # Per example: the whole branch is zero, or all of it is scaled by 1 / (1 - rate).
    np.testing.assert_array_equal(out[~kept], 0)
    np.testing.assert_array_equal(out[kept], np.float32(1) / np.float32(1 - rate))
    assert binomial_ok(int((~kept).sum()), n, rate), (~kept).mean()
  assert np.asarray(drop_path(x, 0.0, jax.random.PRNGKey(1))).min() == 1   # rate 0 keeps all


def test_mlp_dropout_rate_and_scaling():
  """MlpBlock with dropout p: hidden units and outputs each dropped with probability p and the
  kept ones scaled by 1 / (1 - p). Dense_0 = 0 with bias 1 makes every hidden unit gelu(1), Dense_1
  the identity, so an output is gelu(1) m1 m2 / (1 - p)^2 with m1, m2 independent keep masks."""
  d, p, n = 8, 0.3, 500
  block = MlpBlock(mlp_dim=d, dropout_rate=p)
  params = {'Dense_0': {'kernel': jnp.zeros((d, d)), 'bias': jnp.ones(d)},
            'Dense_1': {'kernel': jnp.eye(d), 'bias': jnp.zeros(d)}}
  x = jnp.zeros((n, d))
  out = np.asarray(block.apply({'params': params}, x, deterministic=False,
                               rngs={'dropout': jax.random.PRNGKey(0)})).ravel()
  h = float(jax.nn.gelu(1.0, approximate=True))
  kept = out != 0
  assert binomial_ok(int(kept.sum()), out.size, (1 - p) ** 2), kept.mean()
  assert_close_to_scale(out[kept], np.full(kept.sum(), h / (1 - p) ** 2), rtol=1e-6, what='kept')
  np.testing.assert_array_equal(block.apply({'params': params}, x), np.full((n, d), h, np.float32))


def test_attention_dropout_rate_and_scaling():
  """Zero queries and keys give uniform weights 1/S; one-hot values make the output the dropped
  weights themselves: 0 with probability p, else (1/S) / (1 - p)."""
  b, s, p = 64, 8, 0.2
  q = jnp.zeros((b, s, 1, s))
  v = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (b, s, 1, s))
  out, _ = dot_product_attention(q, q, v, dropout_rate=p, dropout_rng=jax.random.PRNGKey(0),
                                 deterministic=False)
  out = np.asarray(out).ravel()
  kept = out != 0
  assert binomial_ok(int(kept.sum()), out.size, 1 - p), kept.mean()
  assert_close_to_scale(out[kept], np.full(kept.sum(), (1 / s) / (1 - p)), rtol=1e-6, what='kept')
  same, _ = dot_product_attention(q, q, v, dropout_rate=p, deterministic=True)
  np.testing.assert_array_equal(same, np.full((b, s, 1, s), 1 / s, np.float32))


@pytest.mark.parametrize('knob', ['dropout_rate', 'attention_dropout_rate', 'stochastic_depth'])
def test_each_regulariser_reaches_the_model(knob):
  """Each option on its own changes the training forward pass (and only that); none changes it
  when all are off."""
  cfg = registry.get_model_config('ViT-testing')
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  plain = create_model(cfg, 5, head_zeroinit=False)
  v = plain.init(jax.random.PRNGKey(0), x)
  rngs = {'dropout': jax.random.PRNGKey(3)}
  np.testing.assert_array_equal(plain.apply(v, x, train=True, rngs=rngs), plain.apply(v, x))
  model = create_model(cfg, 5, head_zeroinit=False, **{knob: 0.5})
  np.testing.assert_array_equal(model.apply(v, x), plain.apply(v, x))
  assert not np.allclose(model.apply(v, x, train=True, rngs=rngs), plain.apply(v, x))


@pytest.mark.parametrize('scan', [False, True])
def test_stochastic_depth_draws_per_example_and_grows_with_depth(scan):
  """ViT-testing has 2 blocks; stochastic depth 0.5 grows linearly from 0 (block 0: never dropped)
  to 0.5 (block 1: attention and MLP branches each dropped per example). 64 copies of one image
  then give exactly 4 distinct outputs (one per pattern of block 1), each about a quarter of the
  time. A batch-wide mask would give 1 output at a time; a constant rate (block 0 dropping too) 16."""
  cfg = registry.get_model_config('ViT-testing')
  x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 3)), (64, 8, 8, 3))
  model = create_model(cfg, 5, head_zeroinit=False, stochastic_depth=0.5, scan=scan)
  v = model.init(jax.random.PRNGKey(0), x[:1])
  out = np.asarray(model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)}))
  # Rows of one pattern agree to rounding; different patterns differ by O(1) of the logits.
  scale = np.abs(out).max()
  _, counts = np.unique(np.round(out / scale, 3), axis=0, return_counts=True)
  assert len(counts) == 4, counts
  assert all(binomial_ok(c, 64, 0.25) for c in counts), counts


def test_exact_gelu_is_pytorchs_erf_formula_and_the_tanh_one_flaxs():
  """'gelu' is x/2 (1 + erf(x/sqrt 2)) (PyTorch's formula; erf, not jax.nn.gelu's slower erfc):
  within 2e-6 of the float64 value and of jax.nn.gelu's exact form, gradients too."""
  x = np.linspace(-8, 8, 4001, dtype=np.float32)
  ref = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
  np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x), 'gelu')), ref, atol=2e-6, rtol=0)
  grad = jax.vmap(jax.grad(lambda v: gelu(v, 'gelu')))(jnp.asarray(x))
  grad_ref = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), np.asarray(grad_ref), atol=2e-6, rtol=0)
  np.testing.assert_array_equal(np.asarray(gelu(jnp.asarray(x), 'gelu_tanh')),
                                np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True)))
  assert gelu(jnp.ones(3, jnp.bfloat16), 'gelu').dtype == jnp.bfloat16
