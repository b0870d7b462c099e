"""Multi-head dot-product attention with the parameter names of Google's ViT checkpoints.

The attention arithmetic lives in one function, `dot_product_attention`, so that the fused kernels of
`jax.nn.dot_product_attention` (implementation `xla` or `cudnn`) can be swapped in and measured without
touching the modules. Shapes use B = batch, T = query tokens, S = key tokens, H = heads, K = head dim.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

IMPLEMENTATIONS = (None, 'xla', 'cudnn', 'explicit', 'auto')


def rows(x: jax.Array, dtype: Any) -> jax.Array:
  """[..., D] -> [rows, D] when computing in float32 (the CPU's dtype); x unchanged otherwise.

  On XLA:CPU, dense layers and LayerNorms over one axis of rows make the gradients of their biases
  and scales sums over one axis, several times faster than over (batch, tokens) (its tree-reduction
  rewriter padded 50 tokens to 64; measured in scripts/benchmark.py model). On a TPU the same
  reshape costs a relayout (197 tokens are not a multiple of its tiles): the ViT-B/16 plan on a
  v5p-64 estimated a 10% slower step with it, so bfloat16 (the accelerators' dtype) keeps [B, T, D].
  """
  if jnp.dtype(dtype) != jnp.float32:
    return x
  return x.reshape(-1, x.shape[-1])


def select_implementation(dtype: Any, head_dim: int, device: Any = None) -> str:
  """What `implementation='auto'` runs: 'cudnn' (flash attention) on an NVIDIA GPU of compute
  capability >= 8.0 when the activations are bfloat16/float16 and the head dim is a multiple of 8 up
  to 128 (cuDNN's fused kernel's limits), 'xla' (`jax.nn.dot_product_attention`'s XLA path)
  otherwise. `device` defaults to the first JAX device."""
  device = device if device is not None else jax.devices()[0]
  capability = getattr(device, 'compute_capability', None)  # set on NVIDIA GPUs only
  try:
    major = int(str(capability).split('.')[0])
  except ValueError:
    major = 0
  max_head = 256 if major >= 9 else 128  # Hopper's kernels take heads up to 256
  if (device.platform == 'gpu' and major >= 8 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
      and head_dim % 8 == 0 and head_dim <= max_head):
    return 'cudnn'
  return 'xla'


def fused_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, implementation: str,
                    bias: Optional[jax.Array] = None, length_multiple: int = 1) -> jax.Array:
  """`jax.nn.dot_product_attention` with the tokens padded to a multiple of `length_multiple`.

  cuDNN's backward pass refuses odd sequence lengths (jax 0.10-0.11 check `T % 2` whenever a bias
  operand exists, and pass an empty one when there is none), and a ViT has 197 tokens. Padding the
  queries, keys and values with zeros and masking the padded keys out (`key_value_seq_lengths`)
  gives the same output for the real queries; the padded query rows are dropped.
  Shapes as `dot_product_attention`; returns [B, T, H, K].
  """
  batch, t, s = query.shape[0], query.shape[1], key.shape[1]
  pad_t, pad_s = -t % length_multiple, -s % length_multiple
  if not (pad_t or pad_s):
    return jax.nn.dot_product_attention(query, key, value, bias=bias, implementation=implementation)
  tokens = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    # Pad only the query/key axes the bias really has (size 1 broadcasts).
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_t if bias.shape[2] > 1 else 0),
                          (0, pad_s if bias.shape[3] > 1 else 0)))
  out = jax.nn.dot_product_attention(
      tokens(query, pad_t), tokens(key, pad_s), tokens(value, pad_s), bias=bias,
      key_value_seq_lengths=jnp.full((batch,), s, jnp.int32), implementation=implementation)
  return out[:, :t]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    implementation: Optional[str] = None,
    dropout_rate: float = 0.0,
    dropout_rng: Optional[jax.Array] = None,
    deterministic: bool = True,
    return_weights: bool = False,
    bias: Optional[jax.Array] = None,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """softmax(q k^T / sqrt(K) + bias) v.

  Args:
    query: [B, T, H, K]; key, value: [B, S, H, K].
    implementation: None or 'explicit' computes softmax in plain jnp (always correct, returns weights,
      supports attention dropout); 'xla' or 'cudnn' call `jax.nn.dot_product_attention` with that
      implementation; 'auto' picks one of the two (`select_implementation`). The fused path is used
      only when neither weights nor dropout are needed.
    dropout_rate: attention-weight dropout, applied only when `deterministic` is False.
    return_weights: also return the attention probabilities [B, H, T, S] in float32.
    bias: optional additive logits bias broadcastable to [B, H, T, S] (relative position bias,
      additive masks), added in float32 to the scaled logits before the softmax.

  Returns:
    (output [B, T, H, K] in query.dtype, weights or None).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}')
  use_dropout = dropout_rate > 0.0 and not deterministic
  if implementation == 'auto':
    implementation = select_implementation(query.dtype, query.shape[-1])
  if implementation in ('xla', 'cudnn') and not return_weights and not use_dropout:
    multiple = 1
    if implementation == 'cudnn':
      multiple = 2  # see fused_attention
      if bias is not None:
        bias = bias.astype(query.dtype)  # cuDNN takes the bias in the activations' dtype
    return fused_attention(query, key, value, implementation=implementation, bias=bias,
                           length_multiple=multiple), None

  depth = query.shape[-1]
  query = query / jnp.sqrt(depth).astype(query.dtype)
  # Logits and softmax in float32: bf16 softmax over long sequences loses the small weights.
  logits = jnp.einsum('bthk,bshk->bhts', query, key, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1)
  probs = weights
  if use_dropout:
    if dropout_rng is None:
      raise ValueError('attention dropout needs a dropout_rng')
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('bhts,bshk->bthk', probs.astype(value.dtype), value)
  return out, (weights if return_weights else None)


class _ProjectionParams(nn.Module):
  """The `kernel` [D, H, K] and `bias` [H, K] of a `DenseGeneral(features=(H, K))`, created with the
  same initialisation (on the flattened [D, H*K] shape), returned instead of applied."""
  features: tuple[int, int]
  param_dtype: Dtype
  kernel_init: Initializer
  bias_init: Initializer

  @nn.compact
  def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
    flat = self.features[0] * self.features[1]
    kernel = self.param('kernel', lambda rng, shape, dtype: self.kernel_init(
        rng, (in_features, flat), dtype).reshape(shape), (in_features, *self.features),
                        self.param_dtype)
    bias = self.param('bias', lambda rng, shape, dtype: self.bias_init(rng, (flat,), dtype).reshape(
        shape), self.features, self.param_dtype)
    return kernel, bias


class MultiHeadDotProductAttention(nn.Module):
  """Self- or cross-attention; parameters `query`, `key`, `value`, `out` as in Google's checkpoints.

  query/key/value kernels are [D, H, K] with biases [H, K]; the out kernel is [H, K, D], bias [D].
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  implementation: Optional[str] = None
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None, *,
               deterministic: bool = True, return_weights: bool = False):
    """inputs_q: [B, T, D]; inputs_kv: [B, S, D] (defaults to inputs_q). Returns ([B, T, D], weights)."""
    if inputs_kv is None:
      inputs_kv = inputs_q
    features = inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'hidden size {features} is not divisible by num_heads {self.num_heads}')
    head_dim = features // self.num_heads
    dense = lambda name: nn.DenseGeneral(
        features=(self.num_heads, head_dim), axis=-1, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)
    in_rows = jnp.dtype(self.dtype) == jnp.float32  # see `rows`
    proj = lambda name, x: dense(name)(rows(x, self.dtype)).reshape(
        *x.shape[:-1], self.num_heads, head_dim)
    if inputs_kv is inputs_q and not deterministic and in_rows:
      # Training self-attention in float32 (the CPU's compute dtype): one matmul for q, k and v, and
      # so one for each of their gradients (Fashion-MNIST model train step x1.10 on the 2-core CPU,
      # ViT-Ti/16 unchanged). Inference keeps three: slicing the fused result cost that model's
      # inference 10%. bfloat16 (the GPU/TPU default) keeps three too: with the fused form, the
      # ViT-B/16 pod plan on v5p-64 estimated a 9% slower step (61 against 56 ms).
      q, k, v = self._fused_qkv(inputs_q, head_dim)
    else:
      q = proj('query', inputs_q)
      k = proj('key', inputs_kv)
      v = proj('value', inputs_kv)
    rng = None
    if self.dropout_rate > 0.0 and not deterministic:
      rng = self.make_rng('dropout')
    y, weights = dot_product_attention(
        q, k, v, implementation=self.implementation, dropout_rate=self.dropout_rate, dropout_rng=rng,
        deterministic=deterministic, return_weights=return_weights)
    out = nn.DenseGeneral(features=features, axis=(-2, -1), dtype=self.dtype,
                          param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                          bias_init=self.bias_init, name='out')(
                              y.reshape(-1, *y.shape[-2:]) if in_rows else y)
    return out.reshape(*y.shape[:-2], features), weights

  def _fused_qkv(self, x: jax.Array, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention's q, k, v [B, T, H, K] from one [B*T, D] x [D, 3, H, K] matmul. The
    parameters stay three (`query`, `key`, `value`), stacked at compute time; the head axis keeps
    its place, so a kernel split over heads (tensor parallelism) stays split."""
    d = x.shape[-1]
    made = [_ProjectionParams((self.num_heads, head_dim), self.param_dtype, self.kernel_init,
                              self.bias_init, name=name)(d) for name in ('query', 'key', 'value')]
    kernel = jnp.stack([k for k, _ in made], axis=1).astype(self.dtype)  # [D, 3, H, K]
    bias = jnp.stack([b for _, b in made]).astype(self.dtype)  # [3, H, K]
    y = jnp.einsum('nd,dchk->nchk', x.reshape(-1, d).astype(self.dtype), kernel) + bias
    y = y.reshape(*x.shape[:-1], 3, self.num_heads, head_dim)
    return y[..., 0, :, :], y[..., 1, :, :], y[..., 2, :, :]
