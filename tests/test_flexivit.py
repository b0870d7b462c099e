"""FlexiViT's PI-resize of the patch embedding (`vit_jax.models.resize`): the token of a resized
patch is kept when the patch grows, the same operator serves the checkpoint transfer
(`load_pretrained` to another `model.patch_size`) and the call inside a jitted function
(`patch_size=` at call time).
The comparisons with timm (its `resample_patch_embed`, its FlexiViT and big_vision loaders) are in
tests/test_flexivit_timm.py."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale
from tests.test_npz import make_params
from vit_jax.checkpoints import load_pretrained
from vit_jax.checkpoints.npz import write_npz
from vit_jax.families import registry
from vit_jax.models import resize

KERNEL = 'embedding/kernel'


def _patches_resized(x: np.ndarray, new_hw, method: str) -> np.ndarray:
  """[N, h, w, C] patches each resized with the grid method itself (not its operator): one call,
  the patches stacked along the channels."""
  n, h, w, c = x.shape
  grid = x.astype(np.float64).transpose(1, 2, 0, 3).reshape(h, w, n * c)
  out = resize.resample_grid(grid, new_hw, method)
  return out.reshape(*new_hw, n, c).transpose(2, 0, 1, 3)


@pytest.mark.parametrize('method,old,new', [
    ('linear', (4, 4), (8, 8)), ('linear', (3, 5), (7, 6)), ('linear', (2, 2), (5, 5)),
    ('bicubic', (3, 5), (7, 6)), ('bilinear', (4, 4), (6, 6))])
def test_pi_resize_keeps_every_token_when_the_patch_grows(method, old, new):
  """<B x, w'> = <x, w> for every patch x (B: the resize of a patch, full column rank when it
  grows), per output channel; numpy and the jitted form agree."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
  x = rng.normal(size=(6, *old, 3))
  tokens = np.einsum('nhwc,hwcd->nd', x, kernel.astype(np.float64))
  big = resize.pi_resize_kernel(kernel, new, method)
  assert big.shape == (*new, 3, 5) and big.dtype == np.float32
  got = np.einsum('nhwc,hwcd->nd', _patches_resized(x, new, method), big.astype(np.float64))
  assert_close_to_scale(got, tokens, rtol=2e-6, what=f'{method} {old}->{new}')
  jitted = jax.jit(lambda k: resize.pi_resize_kernel_jax(k, new, method))(jnp.asarray(kernel))
  assert_close_to_scale(np.asarray(jitted), big, rtol=1e-6, what='jax vs numpy')


def test_pi_resize_when_the_patch_shrinks_is_the_least_squares_kernel():
  """Shrinking loses detail: no kernel keeps every token, PI-resize's minimises the squared error
  over all patches (|B^T w' - w|): no perturbation of it does better."""
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(6, 6, 1, 1))
  small = resize.pi_resize_kernel(kernel, (4, 4), 'linear').astype(np.float64)
  b = resize.grid_operator((6, 6), (4, 4), 'linear').astype(np.float64)  # [16, 36]
  err = lambda w: np.linalg.norm(b.T @ w.reshape(16) - kernel.reshape(36))
  best = err(small)
  assert best > 1e-3  # not exact: a shrink cannot keep every token
  for _ in range(20):
    assert err(small + 1e-3 * rng.normal(size=small.shape)) > best
  assert resize.pi_resize_kernel(kernel, (6, 6)) is kernel


def test_pi_resize_refuses_what_is_not_a_kernel():
  with pytest.raises(ValueError, match=r'\[ph, pw, C, D\]'):
    resize.pi_resize_kernel(np.zeros((4, 4, 3)), 8)
  with pytest.raises(ValueError, match='not one of'):
    resize.pi_resize_kernel(np.zeros((4, 4, 3, 2)), 8, 'nearest')
  assert resize.patch_method('bicubic') == 'bicubic'
  assert resize.patch_method('bilinear') == resize.patch_method('linear') == 'linear'


def _resize_each_patch(images: np.ndarray, old: int, new: int, method: str = 'linear'
                       ) -> np.ndarray:
  """[B, g*old, g*old, C] -> [B, g*new, g*new, C]: every old x old patch resized on its own (the
  FlexiViT identity is per patch; a whole-image resize mixes neighbouring patches at the seams)."""
  b, h, w, c = images.shape
  gh, gw = h // old, w // old
  patches = images.reshape(b, gh, old, gw, old, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(-1, old, old, c)
  out = np.stack([resize.resample_grid(p, (new, new), method) for p in patches])
  out = out.reshape(b, gh, gw, new, new, c).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, gh * new, gw * new, c)


def _init(model, size):
  """Stand-in initial parameters: noise in the init's shapes (eval_shape compiles nothing)."""
  x = np.zeros((1, size, size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  rng = np.random.default_rng(7)
  return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype), shapes)


def _logits(model, params, x, **kwargs):
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, **kwargs))(params, x))


def test_transfer_to_another_patch_size_sees_a_resized_image_as_the_source_saw_it(tmp_path):
  """A patch-4 checkpoint at 16 px (4x4 grid) loaded into a patch-8 model at 32 px (the same 4x4
  grid, so the table is kept): the kernel is PI-resized and named in the report, and the new model
  on the image whose patches are resized to 8x8 gives the source model's logits on the 16 px one."""
  src = make_params('vit_jax', seed=3)
  write_npz(tmp_path / 'p4.npz', src)
  fields = registry.get_model_config('ViT-testing')
  source = registry.create_model(fields, 5)
  target = registry.create_model(fields, 5, patch_size=8)
  lines = []
  params, report = load_pretrained(tmp_path / 'p4.npz', _init(target, 32), model=target,
                                   posemb_resize='linear', log=lines.append)
  assert (KERNEL, (4, 4, 3, 32), (8, 8, 3, 32)) in report.reshaped
  assert any(f'{KERNEL}: patch 4x4 -> 8x8 (PI-resize, linear)' in l for l in lines), lines
  assert not report.added and not report.dropped
  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  x32 = _resize_each_patch(x, 4, 8)
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  want = _logits(source, params_lib.unflatten(src), x)
  assert_close_to_scale(_logits(target, params, x32), want, rtol=2e-5)


def test_transfer_to_another_patch_size_resamples_the_table_to_the_new_grid(tmp_path):
  """Patch 4 -> 2 at 16 px: the 4x4 table goes to 8x8 with the method asked for, the kernel is
  shrunk by PI-resize (bicubic with bicubic tables), and both are named."""
  write_npz(tmp_path / 'p4.npz', make_params('vit_jax', seed=4))
  target = registry.create_model(registry.get_model_config('ViT-testing'), 5, patch_size=2)
  params, report = load_pretrained(tmp_path / 'p4.npz', _init(target, 16), model=target,
                                   posemb_resize='bicubic', log=None)
  assert params['embedding']['kernel'].shape == (2, 2, 3, 32)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 65, 32)
  assert any('patch 4x4 -> 2x2 (PI-resize, bicubic)' in n for n in report.notes), report.notes
  assert any('grid 4x4 -> 8x8 (bicubic)' in n for n in report.notes), report.notes


@pytest.mark.parametrize('method,patch,size', [('linear', 2, 16), ('bicubic', 8, 32)])
def test_call_at_another_patch_size_equals_the_transferred_model(method, patch, size, tmp_path):
  """`model.apply(..., patch_size=p)` of a patch-4 model (kernel PI-resized and table resampled in
  the jitted call, with dynamic_resize=method) equals a model built at patch p from the checkpoint
  transferred with posemb_resize=method; the gradient reaches the stored 4x4 kernel (checked once:
  a compilation of the backward pass costs seconds)."""
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  src = make_params('vit_jax', seed=5)
  write_npz(tmp_path / 'p4.npz', src)
  fields = {**registry.get_model_config('ViT-testing'), 'dynamic_resize': method}
  flexible = registry.create_model(fields, 5)
  stored = params_lib.unflatten(src)
  built = registry.create_model(fields, 5, patch_size=patch)
  moved, _ = load_pretrained(tmp_path / 'p4.npz', _init(built, size), model=built,
                             image_size=(size, size), posemb_resize=method, log=None)
  x = np.random.default_rng(6).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  got = _logits(flexible, stored, x, patch_size=patch)
  assert_close_to_scale(got, _logits(built, moved, x), rtol=2e-5, what=f'{method} patch {patch}')
  with pytest.raises(ValueError, match="initialise at the model's patch size"):
    flexible.init(jax.random.PRNGKey(0), x, patch_size=patch)
  if method != 'linear':
    return
  loss = lambda p: jnp.sum(flexible.apply({'params': p}, x, patch_size=patch) ** 2)
  with jax.default_matmul_precision('highest'):
    grads = jax.jit(jax.grad(loss))(stored)
  assert grads['embedding']['kernel'].shape == (4, 4, 3, 32)
  assert float(jnp.abs(grads['embedding']['kernel']).max()) > 0


@pytest.mark.slow
def test_finetune_recipe_moves_a_big_vision_file_to_another_patch_size(tmp_path):
  """`configs/finetune.py:model=FlexiViT-S,pretrained=FILE --config.model.patch_size=4` with a
  big_vision file (`params/`, kernel at patch 8, 2x2 table, class token without a row: FlexiViT's
  layout in small): the run starts and trains, and its log names the kernel's PI-resize and the
  table's resampling (linear, FlexiViT's)."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.sharding_worker import worker_env  # pylint: disable=import-outside-toplevel
  src = make_params('big_vision', patch=8, grid=(2, 2), classes=1000, seed=8)
  np.savez(tmp_path / 'flexi.npz', **{f'params/{k}': v for k, v in src.items()})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = ['--config=configs/finetune.py:model=FlexiViT-S,dataset=digits,'
          f'pretrained={tmp_path / "flexi.npz"}', '--config.model.hidden_size=32',
          '--config.model.num_layers=2', '--config.model.num_heads=2', '--config.model.mlp_dim=64',
          '--config.model.patch_size=4', '--config.image_size=16', '--config.posemb_resize=linear',
          '--config.batch_size=8', '--config.total_steps=2', '--config.warmup_steps=0',
          '--config.eval_every=0', '--config.checkpoint_every=2', '--config.augment=resize',
          '--config.progress=False']
  out = subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "w"}',
                        *args], cwd=root, capture_output=True, text=True, timeout=900,
                       env=worker_env())
  assert out.returncode == 0, out.stderr[-4000:]
  log = out.stderr
  assert 'reshaped embedding/kernel: (8, 8, 3, 32) -> (4, 4, 3, 32)' in log, log[-3000:]
  assert 'embedding/kernel: patch 8x8 -> 4x4 (PI-resize, linear)' in log, log[-3000:]
  assert 'grid 2x2 -> 4x4 (linear)' in log, log[-3000:]
  print('\n'.join(l for l in log.splitlines() if 'embedding' in l or 'loaded' in l))
