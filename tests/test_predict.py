"""vit_jax.predict: logits in input order, class names, resizing, bare .npz with --model, bad files."""

import jax
import numpy as np
import pytest
from tests.numerics import assert_close_to_scale
from PIL import Image

from vit_jax.families import registry
from vit_jax import predict
from vit_jax.checkpoints import manager
from vit_jax.families.base import Architecture
from vit_jax.checkpoints.npz import write_npz
from vit_jax.families.registry import create_model
from vit_jax.models import params as params_lib

NAMES = ['ant', 'bee', 'cat', 'dog', 'eel']


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  root = tmp_path_factory.mktemp('pred')
  cfg = dict(registry.get_model_config('ViT-testing'))
  model = create_model(cfg, 5, head_zeroinit=False)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))['params']
  params = jax.tree.map(np.asarray, params)
  arch = Architecture(cfg, 5, (16, 16), 3)
  manager.save_params(root / 'run', params, {'architecture': arch.to_meta(), 'class_names': NAMES})
  write_npz(root / 'bare.npz', params_lib.flatten(params))
  rng = np.random.default_rng(0)
  imgs = root / 'imgs'
  imgs.mkdir()
  pixels = {}
  for name in ('b.png', 'a.png', 'c.bmp'):
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(imgs / name)
    pixels[name] = arr
  Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)).save(root / 'big.png')
  return root, model, params, pixels


def _ref_logits(model, params, arrays):
  x = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
  return np.asarray(model.apply({'params': params}, x))


def test_folder_in_sorted_order_with_class_names(checkpoint, tmp_path, capsys):
  root, model, params, pixels = checkpoint
  out = tmp_path / 'logits.npy'
  rc = predict.main(['--checkpoint', str(root / 'run'), str(root / 'imgs'), '--logits_out', str(out)])
  assert rc == 0
  logits = np.load(out)
  assert logits.dtype == np.float32 and logits.shape == (3, 5)
  # Images already at the model's size pass unchanged: logits equal the model on the raw pixels.
  want = _ref_logits(model, params, [pixels['a.png'], pixels['b.png'], pixels['c.bmp']])
  # The same model on the same pixels, jitted in another batch: rounding of O(1) logits only.
  assert_close_to_scale(logits, want, rtol=1e-5)
  text = capsys.readouterr().out
  assert text.index('a.png') < text.index('b.png') < text.index('c.bmp')
  best = NAMES[int(np.argmax(want[0]))]
  first_block = text.split('a.png')[1].splitlines()[1]
  assert best in first_block and '%' in first_block


def test_given_order_resize_and_bare_npz_with_model(checkpoint, tmp_path, capsys):
  root, model, params, pixels = checkpoint
  out = tmp_path / 'l.npy'
  files = [str(root / 'imgs' / 'c.bmp'), str(root / 'big.png'), str(root / 'imgs' / 'a.png')]
  rc = predict.main(['--checkpoint', str(root / 'bare.npz'), '--model', 'ViT-testing',
                     '--image_size', '16', *files, '--logits_out', str(out)])
  assert rc == 0
  logits = np.load(out)
  assert logits.shape == (3, 5)
  assert_close_to_scale(logits[[0, 2]], _ref_logits(model, params, [pixels['c.bmp'],
                                                                   pixels['a.png']]), rtol=1e-5)
  assert 'ant' not in capsys.readouterr().out   # a bare npz has no class names: indices


def test_errors_are_clear(checkpoint, tmp_path, capsys):
  root, *_ = checkpoint
  bad = tmp_path / 'bad.png'
  bad.write_text('not an image')
  rc = predict.main(['--checkpoint', str(root / 'run'), str(bad), str(root / 'imgs' / 'a.png')])
  err = capsys.readouterr().err
  assert rc == 1 and 'bad.png' in err
  assert predict.main(['--checkpoint', str(tmp_path / 'nope'), str(bad)]) == 2
  assert 'no checkpoint' in capsys.readouterr().err
  # The named architecture must fit the parameters.
  assert predict.main(['--checkpoint', str(root / 'bare.npz'), '--model', 'ViT-B_16',
                       str(root / 'imgs')]) == 2
  assert 'hidden_size' in capsys.readouterr().err
