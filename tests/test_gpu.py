"""The accelerator code paths on a real NVIDIA GPU: cuDNN flash attention chosen by `'auto'`, its
numerics (forward and gradients, with and without a logits bias) against the explicit softmax in
bfloat16, and a bfloat16 train step through cuDNN attention and remat against the explicit one.

Skipped without a CUDA GPU (CI has none; the selection logic is tested on the CPU in
tests/test_attention.py). `scripts/gpu_check.sh` runs this file on a lent GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_trees_close_to_scale
from vit_jax.families import registry
from vit_jax.models import attention

pytestmark = pytest.mark.skipif(
    jax.default_backend() != 'gpu' or getattr(jax.devices()[0], 'compute_capability', None) is None,
    reason='needs an NVIDIA GPU')

# bfloat16 keeps 8 bits of mantissa (eps 2^-8 = 0.0039). The fused kernel and the explicit softmax
# round at different points (flash attention rescales partial sums block by block), so outputs of
# size O(1) agree to a few bf16 ulps of their scale; gradients sum T terms more.
BF16_RTOL = 2e-2


def _qkv(shape, seed=0, dtype=jnp.bfloat16):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))


def test_auto_picks_cudnn_on_this_gpu_for_bf16_and_xla_for_float32():
  major = int(str(jax.devices()[0].compute_capability).split('.')[0])
  want = 'cudnn' if major >= 8 else 'xla'
  assert attention.select_implementation(jnp.bfloat16, 64) == want
  assert attention.select_implementation(jnp.float32, 64) == 'xla'


@pytest.mark.parametrize('with_bias', [False, True])
@pytest.mark.parametrize('tokens', [197, 1024])  # ViT-B/16's 197 (not a multiple of the block), 32x32
def test_cudnn_forward_and_gradients_match_the_explicit_softmax(with_bias, tokens):
  q, k, v = _qkv((2, tokens, 4, 64))
  bias = None
  if with_bias:
    bias = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, tokens, tokens)), jnp.float32)

  def run(impl):
    def f(q, k, v):
      out, _ = attention.dot_product_attention(q, k, v, implementation=impl, bias=bias)
      return out
    out, vjp = jax.vjp(f, q, k, v)
    cot = jnp.asarray(np.random.default_rng(2).normal(size=out.shape), out.dtype)
    return out, vjp(cot)

  out_c, grads_c = jax.jit(lambda: run('cudnn'))()
  out_e, grads_e = jax.jit(lambda: run('explicit'))()
  assert out_c.dtype == jnp.bfloat16
  assert_close_to_scale(out_c.astype(jnp.float32), out_e.astype(jnp.float32), rtol=BF16_RTOL,
                        what='output')
  for name, a, b in zip('qkv', grads_c, grads_e):
    assert_close_to_scale(a.astype(jnp.float32), b.astype(jnp.float32), rtol=BF16_RTOL,
                          what=f'd{name}')


def test_cudnn_is_really_used_by_auto():
  """The compiled program of 'auto' in bf16 holds a cuDNN fused attention call, not a softmax."""
  q, k, v = _qkv((2, 197, 4, 64))
  f = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation='auto')[0])
  hlo = f.lower(q, k, v).compile().as_text()
  assert '__cudnn$fmha' in hlo, 'no cuDNN fused attention in the compiled program'


@functools.lru_cache(maxsize=None)  # the explicit reference is compiled once for the three cases
def _step(impl, remat):
  model = registry.create_model(registry.get_model_config('ViT-testing'), 5, dtype=jnp.bfloat16,
                                attention_impl=impl, remat=remat)
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  labels = jax.nn.one_hot(jnp.array([1, 3, 0, 4]), 5)

  def loss(p):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('remat', [False, 'dots_saveable', 'nothing_saveable'])
def test_bf16_train_step_through_cudnn_matches_explicit(remat):
  loss_e, g_e = _step('explicit', False)
  loss_c, g_c = _step('auto', remat)
  assert np.isfinite(float(loss_c))
  assert_close_to_scale(loss_c, loss_e, rtol=BF16_RTOL)
  # Parameters are float32 and gradients too; their noise is the bf16 activations'.
  assert_trees_close_to_scale(g_c, g_e, rtol=5e-2)
