"""Attention implementations and remat policies: the selection logic of `attention_impl='auto'`
(checked on CPU with stand-in devices, since CI has no GPU), the numerics of every implementation
that runs here against the explicit softmax, and every remat policy against no remat."""
from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_trees_close_to_scale
from vit_jax.families import registry
from vit_jax.models import attention
from vit_jax.models.vit import REMAT_POLICIES


def _device(platform: str, capability=None):
  d = types.SimpleNamespace(platform=platform)
  if capability is not None:
    d.compute_capability = capability
  return d


@pytest.mark.parametrize('device, dtype, head_dim, want', [
    (_device('gpu', '9.0'), jnp.bfloat16, 64, 'cudnn'),    # H100: flash attention
    (_device('gpu', '8.0'), jnp.float16, 128, 'cudnn'),    # A100, the largest head cuDNN fuses
    (_device('gpu', '9.0'), jnp.float32, 64, 'xla'),       # cuDNN's fused kernel is half precision
    (_device('gpu', '9.0'), jnp.bfloat16, 256, 'cudnn'),   # Hopper takes heads up to 256
    (_device('gpu', '8.0'), jnp.bfloat16, 256, 'xla'),     # ... Ampere up to 128
    (_device('gpu', '9.0'), jnp.bfloat16, 264, 'xla'),     # head too wide for any kernel
    (_device('gpu', '9.0'), jnp.bfloat16, 36, 'xla'),      # not a multiple of 8
    (_device('gpu', '7.5'), jnp.bfloat16, 64, 'xla'),      # pre-Ampere
    (_device('gpu'), jnp.bfloat16, 64, 'xla'),             # a GPU without CUDA capability (ROCm)
    (_device('cpu'), jnp.bfloat16, 64, 'xla'),
    (_device('tpu'), jnp.bfloat16, 128, 'xla'),
])
def test_auto_selects_cudnn_only_where_its_kernel_applies(device, dtype, head_dim, want):
  assert attention.select_implementation(dtype, head_dim, device) == want


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the CPU case; tests/test_gpu.py has the GPU one')
def test_auto_on_a_cpu_is_xla():
  assert attention.select_implementation(jnp.float32, 64) == 'xla'
  assert attention.select_implementation(jnp.bfloat16, 64) == 'xla'


@pytest.mark.parametrize('impl', ['xla', 'auto'])
@pytest.mark.parametrize('with_bias', [False, True])
def test_fused_implementations_match_the_explicit_softmax(impl, with_bias):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 4, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(1, 4, 17, 17)), jnp.float32) if with_bias else None
  with jax.default_matmul_precision('highest'):  # TF32 on a GPU would blur the comparison
    want, _ = attention.dot_product_attention(q, k, v, implementation='explicit', bias=bias)
    got, weights = attention.dot_product_attention(q, k, v, implementation=impl, bias=bias)
  assert weights is None
  # float32 softmax-weighted sums of O(1) values: rounding of a few ulps of the output scale.
  assert_close_to_scale(got, want, rtol=1e-5)


@pytest.mark.parametrize('bias_shape', [None, (1, 4, 17, 17), (2, 1, 1, 17)])
def test_padding_for_cudnn_keeps_output_and_gradients(bias_shape):
  """The odd-length padding cuDNN needs (17 tokens -> 18 with the 18th key masked), run through
  XLA's kernel here: the same outputs and input gradients as the explicit softmax."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 4, 8)), jnp.float32) for _ in range(3))
  bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def padded(q, k, v):
    return attention.fused_attention(q, k, v, implementation='xla', bias=bias, length_multiple=2)

  def explicit(q, k, v):
    return attention.dot_product_attention(q, k, v, implementation='explicit', bias=bias)[0]

  with jax.default_matmul_precision('highest'):  # TF32 on a GPU would blur the comparison
    out_p, vjp_p = jax.vjp(padded, q, k, v)
    out_e, vjp_e = jax.vjp(explicit, q, k, v)
    grads_p, grads_e = vjp_p(cot), vjp_e(cot)
  assert out_p.shape == q.shape
  assert_close_to_scale(out_p, out_e, rtol=1e-5)
  for a, b in zip(grads_p, grads_e):
    assert_close_to_scale(a, b, rtol=1e-5)


def test_auto_still_returns_weights_and_supports_dropout():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 5, 2, 4)), jnp.float32) for _ in range(3))
  _, weights = attention.dot_product_attention(q, k, v, implementation='auto', return_weights=True)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  out, _ = attention.dot_product_attention(q, k, v, implementation='auto', dropout_rate=0.5,
                                           dropout_rng=jax.random.PRNGKey(0), deterministic=False)
  plain, _ = attention.dot_product_attention(q, k, v, implementation='auto')
  assert not np.allclose(out, plain)  # dropout took effect: the explicit path ran


def test_unknown_implementation_is_refused():
  x = jnp.zeros((1, 2, 1, 4))
  with pytest.raises(ValueError, match='auto'):
    attention.dot_product_attention(x, x, x, implementation='flash')


def _loss_and_grads(name: str, **overrides):
  model = registry.create_model(registry.get_model_config(name), 5, **overrides)
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  labels = jax.nn.one_hot(jnp.array([1, 3]), 5)

  def loss(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))
  return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize('policy', [True, *REMAT_POLICIES])
def test_every_remat_policy_gives_the_plain_gradients(policy):
  loss0, g0 = _loss_and_grads('ViT-testing', stochastic_depth=0.1)
  loss1, g1 = _loss_and_grads('ViT-testing', stochastic_depth=0.1, remat=policy)
  # Recomputation reorders no arithmetic that matters beyond float32 rounding of each leaf.
  assert_close_to_scale(loss1, loss0, rtol=1e-6)
  assert_trees_close_to_scale(g1, g0, rtol=1e-5)


def test_mixer_takes_a_remat_policy_and_a_bad_one_is_named():
  _, g0 = _loss_and_grads('Mixer-testing')
  _, g1 = _loss_and_grads('Mixer-testing', remat='dots_saveable')
  assert_trees_close_to_scale(g1, g0, rtol=1e-5)
  with pytest.raises(ValueError, match='dots_saveable'):
    _loss_and_grads('ViT-testing', remat='everything')


def test_training_fuses_qkv_into_one_matmul_with_the_same_parameters_and_numbers():
  """Training self-attention stacks the query/key/value kernels into one matmul; inference keeps
  three. Same parameters (names, shapes, initial values whichever path creates them), same outputs
  and same gradients."""
  mha = attention.MultiHeadDotProductAttention(num_heads=2)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 8)), jnp.float32)
  p_eval = mha.init(jax.random.PRNGKey(0), x)['params']
  p_train = mha.init(jax.random.PRNGKey(0), x, deterministic=False)['params']
  assert jax.tree_util.tree_structure(p_eval) == jax.tree_util.tree_structure(p_train)
  for a, b in zip(jax.tree_util.tree_leaves(p_eval), jax.tree_util.tree_leaves(p_train)):
    np.testing.assert_array_equal(a, b)

  def loss(p, deterministic):
    y, _ = mha.apply({'params': p}, x, deterministic=deterministic)
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size)
  train_jaxpr = str(jax.make_jaxpr(lambda p: loss(p, False))(p_eval))
  assert train_jaxpr.count('dot_general') == 1 + 2 + 1  # qkv, the two attention products, out
  with jax.default_matmul_precision('highest'):
    (l_e, g_e), (l_t, g_t) = (jax.value_and_grad(loss)(p_eval, d) for d in (True, False))
  assert_close_to_scale(l_t, l_e, rtol=1e-6)
  assert_trees_close_to_scale(g_t, g_e, rtol=1e-6)
