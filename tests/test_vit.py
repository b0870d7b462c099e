"""The ViT family: exact parameter counts, Google's parameter paths, shapes, and the paper's equations."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from tests.numerics import assert_close_to_scale, assert_trees_close_to_scale
import pytest

from vit_jax.families import registry
from vit_jax.families.registry import create_model
from vit_jax.families import vit as vit_family
from vit_jax.models import params as params_lib

# Google's released models at 224x224 with 1000 classes and a class token (issue A's table).
EXPECTED_COUNTS = {
    'ViT-Ti_16': 5_717_416, 'ViT-S_16': 22_050_664, 'ViT-S_32': 22_878_952,
    'ViT-B_16': 86_567_656, 'ViT-B_32': 88_224_232, 'ViT-B_8': 86_576_872,
    'ViT-L_16': 304_326_632, 'ViT-L_32': 306_535_400, 'ViT-H_14': 632_045_800,
}
# Small CPU models at 28x28x1, 10 classes: counted by hand from the architecture below.
SMALL = ('ViT-Mini_4', 'ViT-Mini_7', 'ViT-Micro_4', 'ViT-Micro_7', 'ViT-testing')


def shapes_of(model, size, channels=3):
  x = jax.ShapeDtypeStruct((1, *size, channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)['params']


def hand_count(cfg, num_classes, size, channels):
  """ViT parameters from the paper's architecture, counted without the model code."""
  d, m, layers, p = cfg.hidden_size, cfg.mlp_dim, cfg.num_layers, cfg.patch_size
  n = (size[0] // p) * (size[1] // p) + 1
  block = 2 * 2 * d + 4 * (d * d + d) + (d * m + m) + (m * d + d)
  return (p * p * channels * d + d) + d + n * d + layers * block + 2 * d + (d * num_classes + num_classes)


# The later ViTs, fields of this family; counted at their sizes in tests/test_families.py.
VARIANTS = ('DeiT3-S_16', 'DeiT3-B_16', 'DINOv2-S_14', 'DINOv2-S_14-reg4', 'DINOv2-B_14-reg4',
            'SigLIP-B_16', 'SigLIP-B_16-gap', 'ViT-Little_16-reg4-gap', 'FlexiViT-S')


def test_every_registered_name_is_counted():
  assert set(EXPECTED_COUNTS) | set(SMALL) | set(VARIANTS) == set(registry.names('vit'))


@pytest.mark.parametrize('name', sorted(EXPECTED_COUNTS))
def test_parameter_counts_match_released_models(name):
  model = create_model(registry.get_model_config(name), 1000)
  assert params_lib.count(shapes_of(model, (224, 224))) == EXPECTED_COUNTS[name]


@pytest.mark.parametrize('name', SMALL)
def test_small_model_counts(name):
  cfg = registry.get_model_config(name)
  model = create_model(cfg, 10)
  assert params_lib.count(shapes_of(model, (28, 28), 1)) == hand_count(cfg, 10, (28, 28), 1)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(KeyError, match='ViT-B_16'):
    registry.get_model_config('ViT-Q_16')


def test_unknown_model_field_is_named():
  with pytest.raises(ValueError, match="'hiden_size'"):
    create_model(registry.get_model_config('ViT-testing'), 10, hiden_size=3)


def test_vit_b16_paths_and_shapes_match_google_checkpoints():
  model = create_model(registry.get_model_config('ViT-B_16'), 1000)
  flat = {k: tuple(v.shape) for k, v in params_lib.flatten(shapes_of(model, (224, 224))).items()}
  expected = {
      'embedding/kernel': (16, 16, 3, 768), 'embedding/bias': (768,), 'cls': (1, 1, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      'Transformer/encoder_norm/scale': (768,), 'Transformer/encoder_norm/bias': (768,),
      'head/kernel': (768, 1000), 'head/bias': (1000,),
  }
  for i in range(12):
    b = f'Transformer/encoderblock_{i}'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      expected[f'{b}/{ln}/scale'] = expected[f'{b}/{ln}/bias'] = (768,)
    for qkv in ('query', 'key', 'value'):
      expected[f'{b}/MultiHeadDotProductAttention_1/{qkv}/kernel'] = (768, 12, 64)
      expected[f'{b}/MultiHeadDotProductAttention_1/{qkv}/bias'] = (12, 64)
    expected[f'{b}/MultiHeadDotProductAttention_1/out/kernel'] = (12, 64, 768)
    expected[f'{b}/MultiHeadDotProductAttention_1/out/bias'] = (768,)
    expected[f'{b}/MlpBlock_3/Dense_0/kernel'] = (768, 3072)
    expected[f'{b}/MlpBlock_3/Dense_0/bias'] = (3072,)
    expected[f'{b}/MlpBlock_3/Dense_1/kernel'] = (3072, 768)
    expected[f'{b}/MlpBlock_3/Dense_1/bias'] = (768,)
  assert flat == expected


def test_representation_layer_and_map_head_paths():
  cfg = registry.get_model_config('ViT-testing')
  model = create_model(cfg, 5, classifier='map', representation_size=24)
  flat = params_lib.flatten(shapes_of(model, (8, 8)))
  assert flat['pre_logits/kernel'].shape == (32, 24)
  assert flat['head/kernel'].shape == (24, 5)
  assert flat['MAPHead_0/probe'].shape == (1, 1, 32)
  assert flat['MAPHead_0/MultiHeadDotProductAttention_0/query/kernel'].shape == (32, 2, 16)
  assert flat['MAPHead_0/MlpBlock_0/Dense_0/kernel'].shape == (32, 64)
  assert 'cls' not in flat
  assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 4, 32)


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
@pytest.mark.parametrize('posemb', ['learned', 'sincos2d', 'none'])
@pytest.mark.parametrize('size', [(16, 16), (8, 20)])
def test_output_shapes(classifier, posemb, size):
  model = create_model(registry.get_model_config('ViT-testing'), 7, classifier=classifier,
                       posemb=posemb, head_zeroinit=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, *size, 2))
  variables = model.init(jax.random.PRNGKey(0), x)
  logits, aux = model.apply(variables, x, return_aux=True)
  n = (size[0] // 4) * (size[1] // 4) + (classifier == 'token')
  assert logits.shape == (3, 7)
  assert aux['pre_logits'].shape == (3, 32)
  assert aux['attention_weights'].shape == (2, 3, 2, n, n)
  np.testing.assert_allclose(aux['attention_weights'].sum(-1), 1.0, atol=1e-5)
  assert np.all(np.isfinite(logits))
  has_posemb = 'posembed_input' in variables['params']['Transformer']
  assert has_posemb == (posemb == 'learned')


def test_every_position_embedding_kind_is_trainable():
  """The paper's ablation trains all three kinds: gradients must reach the patch embedding."""
  for posemb in ('learned', 'sincos2d', 'none'):
    model = create_model(registry.get_model_config('ViT-testing'), 3, posemb=posemb,
                         head_zeroinit=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
    params = model.init(jax.random.PRNGKey(0), x)['params']
    grads = jax.grad(lambda p: model.apply({'params': p}, x).sum())(params)
    assert float(jnp.abs(grads['embedding']['kernel']).sum()) > 0


def test_image_not_divisible_by_patch_is_a_clear_error():
  model = create_model(registry.get_model_config('ViT-testing'), 3)
  with pytest.raises(ValueError, match='not divisible by the patch size'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 12, 3)))


def test_head_init_options():
  cfg = registry.get_model_config('ViT-testing')
  x = jnp.ones((1, 8, 8, 3))
  p = create_model(cfg, 4, head_bias_init=-6.9).init(jax.random.PRNGKey(0), x)['params']
  np.testing.assert_array_equal(p['head']['kernel'], 0.0)
  np.testing.assert_allclose(p['head']['bias'], -6.9)
  p = create_model(cfg, 4, head_zeroinit=False).init(jax.random.PRNGKey(0), x)['params']
  assert float(jnp.abs(p['head']['kernel']).sum()) > 0


# ---------- The paper's equations in plain NumPy ----------

def _ln(x, scale, bias, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale + bias


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def numpy_vit(p, images, patch, heads, classifier='token', representation=False):
  """z0 = [x_class; x_p E] + E_pos; pre-LN MSA and MLP blocks; y = LN(z_L^0); head."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  b, h, w, c = images.shape
  x = images.astype(np.float64).reshape(b, h // patch, patch, w // patch, patch, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch * patch * c)  # x_p: [B, N, P^2 C]
  e = p['embedding']['kernel'].reshape(patch * patch * c, -1)  # E, conv kernel as [P^2 C, D]
  z = x @ e + p['embedding']['bias']
  if classifier == 'token':
    z = np.concatenate([np.broadcast_to(p['cls'], (b, 1, z.shape[-1])), z], axis=1)
  z = z + p['Transformer']['posembed_input']['pos_embedding']
  enc = p['Transformer']
  i = 0
  while f'encoderblock_{i}' in enc:
    blk = enc[f'encoderblock_{i}']
    y = _ln(z, blk['LayerNorm_0']['scale'], blk['LayerNorm_0']['bias'])
    att = blk['MultiHeadDotProductAttention_1']
    q, k, v = (np.einsum('bnd,dhk->bnhk', y, att[n]['kernel']) + att[n]['bias']
               for n in ('query', 'key', 'value'))
    logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum('bhqs,bshk->bqhk', a, v)
    z = z + np.einsum('bqhk,hkd->bqd', o, att['out']['kernel']) + att['out']['bias']
    y = _ln(z, blk['LayerNorm_2']['scale'], blk['LayerNorm_2']['bias'])
    mlp = blk['MlpBlock_3']
    y = _gelu_tanh(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    z = z + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    i += 1
  z = _ln(z, enc['encoder_norm']['scale'], enc['encoder_norm']['bias'])
  y = z[:, 0] if classifier == 'token' else z.mean(1)
  if representation:
    y = np.tanh(y @ p['pre_logits']['kernel'] + p['pre_logits']['bias'])
  return y @ p['head']['kernel'] + p['head']['bias']


def _random_params(params, seed=0):
  """Replaces every parameter by N(0, 0.3) noise so that zero inits cannot hide a wrong path."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


@pytest.mark.parametrize('classifier,representation,size',
                         [('token', False, (12, 12)), ('gap', True, (8, 16))])
def test_forward_matches_numpy_equations(classifier, representation, size):
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    model = create_model(registry.get_model_config('ViT-testing'), 5, classifier=classifier,
                         representation_size=16 if representation else None)
    x = np.random.RandomState(0).uniform(-1, 1, (2, *size, 3)).astype(np.float32)
    params = _random_params(model.init(jax.random.PRNGKey(0), x)['params'])
    got = np.asarray(model.apply({'params': params}, x))
    want = numpy_vit(params, x, 4, 2, classifier, representation)
    # float32 at 'highest' precision against float64 NumPy: ~sqrt(n) eps per dot product of n <= 64
    # terms, through 2 blocks and 3 LayerNorms; 1e-5 of the logits' scale.
    assert_close_to_scale(got, want, rtol=1e-5, what='logits vs numpy')
    assert np.abs(want).max() > 0.3   # logits of size, not a vanishing head
  finally:
    jax.config.update('jax_default_matmul_precision', None)


def test_scan_and_loop_give_same_outputs_from_converted_params():
  cfg = registry.get_model_config('ViT-testing')
  loop = create_model(cfg, 5, head_zeroinit=False)
  scan = create_model(cfg, 5, head_zeroinit=False, scan=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  p_loop = loop.init(jax.random.PRNGKey(0), x)['params']
  p_scan = scan.init(jax.random.PRNGKey(0), x)['params']
  assert p_scan['Transformer']['encoderblock']['LayerNorm_0']['scale'].shape == (2, 32)
  # Same tree structure both ways.
  assert jax.tree.structure(vit_family.stack_blocks(p_loop)) == jax.tree.structure(p_scan)
  assert jax.tree.structure(vit_family.unstack_blocks(p_scan)) == jax.tree.structure(p_loop)
  out_loop, aux_loop = loop.apply({'params': p_loop}, x, return_aux=True)
  out_scan, aux_scan = scan.apply({'params': vit_family.stack_blocks(p_loop)}, x, return_aux=True)
  # The same operations on the same numbers; a scan may only fuse and sum them in another order:
  # ~sqrt(n) eps for dot products of n <= 64 terms through 2 blocks; measured 3e-7 of the scale.
  assert_close_to_scale(out_scan, out_loop, rtol=1e-5, what='logits')
  assert_close_to_scale(aux_scan['attention_weights'], aux_loop['attention_weights'], rtol=1e-5,
                        what='attention weights')
  # And back: scanned init converted to loop layout.
  assert_close_to_scale(loop.apply({'params': vit_family.unstack_blocks(p_scan)}, x),
                        scan.apply({'params': p_scan}, x), rtol=1e-5, what='unstacked')
  # Round trip is exact.
  back = vit_family.unstack_blocks(vit_family.stack_blocks(p_loop))
  jax.tree.map(np.testing.assert_array_equal, back, p_loop)


def test_remat_matches_plain_and_trains():
  cfg = registry.get_model_config('ViT-testing')
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  for scan in (False, True):
    plain = create_model(cfg, 5, head_zeroinit=False, scan=scan)
    remat = create_model(cfg, 5, head_zeroinit=False, scan=scan, remat=True)
    p = plain.init(jax.random.PRNGKey(0), x)['params']
    loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)
    g1, g2 = jax.grad(loss(plain))(p), jax.grad(loss(remat))(p)
    # Remat recomputes the same forward, so only float32 summation order may differ: 1e-5 of the
    # gradients' scale (~50 here; an absolute 1e-5 failed on some CPUs).
    assert_trees_close_to_scale(g2, g1, rtol=1e-5)
    assert any(float(jnp.max(jnp.abs(g))) > 1.0 for g in jax.tree.leaves(g1))  # not all zero


def test_dropout_and_stochastic_depth_only_in_training():
  model = create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False,
                       dropout_rate=0.1, attention_dropout_rate=0.1, stochastic_depth=0.5)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)
  assert not np.allclose(a, model.apply(v, x))
  # Scanned blocks draw per-layer randomness too and still train.
  scan = create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False,
                      stochastic_depth=0.5, scan=True)
  vs = scan.init(jax.random.PRNGKey(0), x)
  c = scan.apply(vs, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
  assert c.shape == (4, 5) and np.all(np.isfinite(c))


def test_fused_attention_matches_explicit():
  cfg = registry.get_model_config('ViT-testing')
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 12, 3))
  explicit = create_model(cfg, 5, head_zeroinit=False)
  fused = create_model(cfg, 5, head_zeroinit=False, attention_impl='xla')
  v = explicit.init(jax.random.PRNGKey(0), x)
  # The fused softmax(q k) v sums in another order: ~sqrt(n) eps over n <= 6 x 16 terms per
  # attention output, carried through 2 blocks; 1e-5 of the logits' scale.
  assert_close_to_scale(fused.apply(v, x), explicit.apply(v, x), rtol=1e-5, what='fused')


def test_bfloat16_forward_is_close_to_float32():
  cfg = registry.get_model_config('ViT-testing')
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 16, 16, 3), minval=-1, maxval=1)
  f32 = create_model(cfg, 10, head_zeroinit=False)
  bf16 = create_model(cfg, 10, head_zeroinit=False, dtype=jnp.bfloat16)
  v = f32.init(jax.random.PRNGKey(0), x)
  ref = f32.apply(v, x)
  out = bf16.apply(v, x)
  assert out.dtype == jnp.bfloat16
  assert jax.tree.leaves(v)[0].dtype == jnp.float32
  rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
  assert rel < 0.05, rel
  # bf16 parameters too (param_dtype): gradients in bf16, close to float32 ones at the same values.
  both = create_model(cfg, 10, head_zeroinit=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  vb = both.init(jax.random.PRNGKey(0), x)
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(vb))
  labels = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  xent = lambda m: lambda p: -jnp.mean(jnp.sum(
      labels * jax.nn.log_softmax(m.apply({'params': p}, x).astype(jnp.float32)), -1))
  g = jax.jit(jax.grad(xent(both)))(vb['params'])
  want = jax.jit(jax.grad(xent(f32)))(jax.tree.map(lambda a: a.astype(jnp.float32), vb['params']))
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(g))
  g = jax.tree.map(lambda a: np.asarray(a, np.float32), g)
  # Not zero: every leaf that has a float32 gradient has a bf16 one, down to the patch embedding.
  scale = max(np.abs(w).max() for w in jax.tree.leaves(want))
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(want)):
    assert np.abs(a).max() > 0 or np.abs(b).max() < 1e-6 * scale, jax.tree_util.keystr(path)
  assert np.abs(g['embedding']['kernel']).max() > 1e-3 * scale
  # bf16 keeps 8 significant bits (eps 2^-8 = 3.9e-3); a gradient passes ~a dozen rounded stages
  # through 2 blocks and back, ~0.05 of the scale if every rounding added up; measured 0.018. 0.1
  # leaves room for another CPU's order of summation; a wrong gradient is off by ~100%.
  assert_trees_close_to_scale(g, want, rtol=0.1)
