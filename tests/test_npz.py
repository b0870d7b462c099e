"""Google's `.npz` layouts: synthetic files in the released names load and give the same logits as an
independent NumPy forward pass in each layout's own conventions."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from vit_jax.checkpoints import npz as npz_lib
from vit_jax.families.vit import FAMILY as VIT
from vit_jax.families import vit as vit_family
from vit_jax.families.vit_interop import INTEROP as VIT_INTEROP
from vit_jax.models import params as params_lib

D, HEADS, LAYERS, MLP, PATCH, CLASSES = 32, 2, 2, 64, 4, 5
# Block module names of each layout: (attention, second LayerNorm, MLP).
BLOCK_NAMES = {'vit_jax': ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3'),
               'big_vision': ('MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')}


def _dense(rng, p, name, shape_in, shape_out):
  p[f'{name}/kernel'] = rng.normal(0, 0.3, (*shape_in, *shape_out)).astype(np.float32)
  p[f'{name}/bias'] = rng.normal(0, 0.3, shape_out).astype(np.float32)


def _ln(rng, p, name):
  p[f'{name}/scale'] = (1 + 0.2 * rng.normal(size=D)).astype(np.float32)
  p[f'{name}/bias'] = (0.2 * rng.normal(size=D)).astype(np.float32)


def _attention(rng, p, name):
  k = D // HEADS
  for n in ('query', 'key', 'value'):
    _dense(rng, p, f'{name}/{n}', (D,), (HEADS, k))
  _dense(rng, p, f'{name}/out', (HEADS, k), (D,))


def make_params(layout='vit_jax', *, grid=(4, 4), classifier='token', representation=None,
                classes=CLASSES, channels=3, seed=0, patch=PATCH):
  """A synthetic checkpoint written directly in a layout's released names and shapes."""
  rng = np.random.RandomState(seed)
  att, ln2, mlp = BLOCK_NAMES[layout]
  p = {}
  _dense(rng, p, 'embedding', (patch, patch, channels), (D,))
  if classifier == 'token':
    p['cls'] = rng.normal(0, 0.3, (1, 1, D)).astype(np.float32)
  n = grid[0] * grid[1]
  if layout == 'vit_jax':
    rows = n + (classifier == 'token')
    p['Transformer/posembed_input/pos_embedding'] = rng.normal(0, .3, (1, rows, D)).astype(np.float32)
  else:
    p['pos_embedding'] = rng.normal(0, 0.3, (1, n, D)).astype(np.float32)
  for i in range(LAYERS):
    b = f'Transformer/encoderblock_{i}'
    _ln(rng, p, f'{b}/LayerNorm_0')
    _attention(rng, p, f'{b}/{att}')
    _ln(rng, p, f'{b}/{ln2}')
    _dense(rng, p, f'{b}/{mlp}/Dense_0', (D,), (MLP,))
    _dense(rng, p, f'{b}/{mlp}/Dense_1', (MLP,), (D,))
  _ln(rng, p, 'Transformer/encoder_norm')
  if classifier == 'map':
    p['MAPHead_0/probe'] = rng.normal(0, 0.3, (1, 1, D)).astype(np.float32)
    _attention(rng, p, 'MAPHead_0/MultiHeadDotProductAttention_0')
    _ln(rng, p, 'MAPHead_0/LayerNorm_0')
    _dense(rng, p, 'MAPHead_0/MlpBlock_0/Dense_0', (D,), (MLP,))
    _dense(rng, p, 'MAPHead_0/MlpBlock_0/Dense_1', (MLP,), (D,))
  width = D
  if representation:
    _dense(rng, p, 'pre_logits', (D,), (representation,))
    width = representation
  if classes:
    _dense(rng, p, 'head', (width,), (classes,))
  return p


# ---------- An independent NumPy forward pass, in each layout's own conventions ----------

def _np_ln(x, p, name, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p[f'{name}/scale'] + p[f'{name}/bias']


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _np_attention(xq, xkv, p, name):
  q, k, v = (np.einsum('bnd,dhk->bnhk', x, p[f'{name}/{n}/kernel']) + p[f'{name}/{n}/bias']
             for x, n in ((xq, 'query'), (xkv, 'key'), (xkv, 'value')))
  logits = np.einsum('bqhk,bshk->bhqs', q, k) / np.sqrt(q.shape[-1])
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum('bhqs,bshk->bqhk', a, v)
  return np.einsum('bqhk,hkd->bqd', o, p[f'{name}/out/kernel']) + p[f'{name}/out/bias']


def _np_mlp(x, p, name):
  x = _np_gelu(x @ p[f'{name}/Dense_0/kernel'] + p[f'{name}/Dense_0/bias'])
  return x @ p[f'{name}/Dense_1/kernel'] + p[f'{name}/Dense_1/bias']


def np_vit(p, images, layout='vit_jax', classifier='token'):
  """Logits of a ViT given its parameters in `layout`'s names, float64."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  att, ln2, mlp = BLOCK_NAMES[layout]
  b, h, w, c = images.shape
  ph, pw = p['embedding/kernel'].shape[:2]
  x = images.astype(np.float64).reshape(b, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, ph * pw * c)
  z = x @ p['embedding/kernel'].reshape(ph * pw * c, -1) + p['embedding/bias']
  if layout == 'big_vision':
    z = z + p['pos_embedding']  # big_vision adds posemb before the class token is prepended.
  if classifier == 'token':
    z = np.concatenate([np.broadcast_to(p['cls'], (b, 1, z.shape[-1])), z], axis=1)
  if layout == 'vit_jax':
    z = z + p['Transformer/posembed_input/pos_embedding']
  i = 0
  while f'Transformer/encoderblock_{i}/LayerNorm_0/scale' in p:
    blk = f'Transformer/encoderblock_{i}'
    y = _np_ln(z, p, f'{blk}/LayerNorm_0')
    z = z + _np_attention(y, y, p, f'{blk}/{att}')
    z = z + _np_mlp(_np_ln(z, p, f'{blk}/{ln2}'), p, f'{blk}/{mlp}')
    i += 1
  z = _np_ln(z, p, 'Transformer/encoder_norm')
  if classifier == 'token':
    y = z[:, 0]
  elif classifier == 'gap':
    y = z.mean(1)
  else:
    probe = np.broadcast_to(p['MAPHead_0/probe'], (b, 1, z.shape[-1]))
    y = _np_attention(probe, z, p, 'MAPHead_0/MultiHeadDotProductAttention_0')
    y = (y + _np_mlp(_np_ln(y, p, 'MAPHead_0/LayerNorm_0'), p, 'MAPHead_0/MlpBlock_0'))[:, 0]
  if 'pre_logits/kernel' in p:
    y = np.tanh(y @ p['pre_logits/kernel'] + p['pre_logits/bias'])
  return y @ p['head/kernel'] + p['head/bias']


def our_logits(flat, images, **overrides):
  """This project's model on the loaded flat params (architecture read off the params)."""
  arch = VIT.infer(flat, image_size=images.shape[1:3])
  model = arch.create_model(**overrides)
  params = params_lib.unflatten(flat)
  if overrides.get('scan'):
    params = vit_family.stack_blocks(params)
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))


def images_of(size=(16, 16), channels=3, batch=2, seed=1):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, *size, channels)).astype(np.float32)


def _write(path, flat):
  with open(path, 'wb') as f:
    np.savez(f, **flat)
  return str(path)


# ---------- Tests ----------

@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_vit_jax_layout_loads_with_same_logits(tmp_path, classifier):
  src = make_params('vit_jax', classifier=classifier, representation=16)
  flat, info = npz_lib.read_npz(_write(tmp_path / 'vit.npz', src))
  assert info['layout'] == 'vit_jax' and not info['notes']
  assert set(flat) == set(src)
  x = images_of()
  # Ours in float32 against the float64 NumPy reference: ~sqrt(n) eps per dot product (n <= 64)
  # through 2 blocks; 1e-5 of the logits' scale (N(0, 0.3) weights give logits of a few units).
  assert_close_to_scale(our_logits(flat, x), np_vit(src, x, 'vit_jax', classifier), rtol=1e-5)


@pytest.mark.parametrize('classifier,scanned,prefix', [
    ('token', False, 'params/'), ('gap', True, 'params/'), ('map', True, 'params/'),
    ('map', False, 'params/img/')])
def test_big_vision_layout_loads_with_same_logits(tmp_path, classifier, scanned, prefix):
  src = make_params('big_vision', classifier=classifier, seed=3)
  disk = dict(src)
  if scanned:
    for k in [k for k in disk if k.startswith('Transformer/encoderblock_0/')]:
      rest = k[len('Transformer/encoderblock_0/'):]
      disk[f'Transformer/encoderblock/{rest}'] = np.stack(
          [disk.pop(f'Transformer/encoderblock_{i}/{rest}') for i in range(LAYERS)])
  disk = {f'{prefix}{k}': v for k, v in disk.items()}
  disk['opt/state/mu/embedding/kernel'] = np.zeros(3)  # Optimizer state beside params: ignored.
  flat, info = npz_lib.read_npz(_write(tmp_path / 'bv.npz', disk))
  assert info['layout'] == 'big_vision' and info['prefix'] == prefix
  assert all('encoderblock/' not in k for k in flat)
  x = images_of()
  ours = our_logits(flat, x)
  # Ours in float32 against the float64 NumPy reference: ~sqrt(n) eps per dot product (n <= 64)
  # through 2 blocks; 1e-5 of the logits' scale (N(0, 0.3) weights give logits of a few units).
  assert_close_to_scale(ours, np_vit(src, x, 'big_vision', classifier), rtol=1e-5)
  if classifier == 'token':  # The class token had no position embedding: a zero row here.
    np.testing.assert_array_equal(flat['Transformer/posembed_input/pos_embedding'][:, 0], 0)
  if scanned:  # And a scanned model here reads the same file.
    assert_close_to_scale(our_logits(flat, x, scan=True), ours, rtol=1e-5, what='scanned')


def test_old_big_vision_files_are_fixed(tmp_path):
  """Combined cls+posemb (s*s+1 rows) stays as it is; a top-level MAP probe moves into MAPHead_0."""
  src = make_params('vit_jax', seed=4)
  disk = {k.replace('MultiHeadDotProductAttention_1', 'MultiHeadDotProductAttention_0')
          .replace('LayerNorm_2', 'LayerNorm_1').replace('MlpBlock_3', 'MlpBlock_0'): v
          for k, v in src.items()}
  disk['pos_embedding'] = disk.pop('Transformer/posembed_input/pos_embedding')
  disk = {f'params/{k}': v for k, v in disk.items()}
  flat, info = npz_lib.read_npz(_write(tmp_path / 'old.npz', disk))
  np.testing.assert_array_equal(flat['Transformer/posembed_input/pos_embedding'],
                                src['Transformer/posembed_input/pos_embedding'])
  x = images_of()
  assert_close_to_scale(our_logits(flat, x), np_vit(src, x), rtol=1e-5)  # as above

  mp = make_params('big_vision', classifier='map', seed=5)
  inline = {(k[len('MAPHead_0/'):] if k.startswith('MAPHead_0/') else k): v for k, v in mp.items()}
  flat, info = npz_lib.read_npz(_write(tmp_path / 'g.npz', inline))
  assert any('MAPHead_0' in n for n in info['notes'])
  assert_close_to_scale(our_logits(flat, x), np_vit(mp, x, 'big_vision', 'map'), rtol=1e-5)


def test_round_trip_npz_ours_npz_is_bitwise(tmp_path):
  src = make_params('vit_jax', classifier='map', representation=8, seed=6)
  first = _write(tmp_path / 'a.npz', src)
  flat, _ = npz_lib.read_npz(first)
  npz_lib.write_npz(tmp_path / 'b.npz', flat)
  with np.load(first, allow_pickle=False) as a, np.load(tmp_path / 'b.npz', allow_pickle=False) as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def test_npz_layout_refuses_scanned_or_big_vision_names():
  bad = {'Transformer/encoderblock/LayerNorm_0/scale': np.ones(2),
         'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel': np.ones(2)}
  good = {'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel': np.ones(2)}
  assert sorted(VIT_INTEROP.npz_keys_ok({**bad, **good})) == sorted(bad)


def test_pickled_arrays_are_refused(tmp_path):
  path = tmp_path / 'evil.npz'
  with open(path, 'wb') as f:
    np.savez(f, **{'embedding/kernel': np.array([{'a': 1}], dtype=object)})
  with pytest.raises(ValueError, match='allow_pickle'):
    npz_lib.read_npz(path)


def test_not_a_vit_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='not a Google ViT, hybrid or Mixer checkpoint'):
    npz_lib.read_npz(_write(tmp_path / 'x.npz', {'weights': np.ones(3)}))


def test_architecture_is_read_off_the_parameters():
  arch = VIT.infer(make_params('vit_jax', classifier='token', representation=16, grid=(3, 3)))
  assert arch.model_config == dict(
      patch_size=PATCH, hidden_size=D, num_layers=LAYERS, num_heads=HEADS, mlp_dim=MLP,
      classifier='token', representation_size=16, posemb='learned')
  assert (arch.num_classes, arch.image_size, arch.channels) == (CLASSES, (12, 12), 3)
  with pytest.raises(ValueError, match=r"does not match the model config 'ViT-B_16': it has "
                                       r"hidden_size=32 \(the config has 768\)"):
    VIT.infer(make_params(), model_config=dict(name='ViT-B_16', hidden_size=768))
  with pytest.raises(ValueError, match='not a square'):
    VIT.infer(make_params(grid=(2, 3)))
  arch = VIT.infer(make_params(grid=(2, 3)), image_size=(8, 12))
  assert VIT.grid(arch.model_config, arch.image_size) == (2, 3)
