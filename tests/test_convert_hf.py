"""Export to and import from Hugging Face transformers (CPU torch): logits agree within 1e-4."""
from __future__ import annotations

import numpy as np
import pytest

from tests.numerics import assert_logits_match
from tests import interop

# Skips where torch or transformers cannot be imported; fails instead under scripts/test.sh.
torch = interop.require('torch')
transformers = interop.require('transformers')

from tests.test_npz import D, HEADS, make_params  # noqa: E402
from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.families.vit import FAMILY as VIT  # noqa: E402
from vit_jax.checkpoints.npz import write_npz  # noqa: E402
from vit_jax.convert import convert, verify  # noqa: E402
from vit_jax.formats import hf  # noqa: E402


@pytest.mark.parametrize('grid', [(14, 14), (14, 10)])  # 224x224 and 224x160 at patch 16.
def test_export_to_hf_matches_logits(tmp_path, grid):
  flat = make_params('vit_jax', grid=grid, patch=16, seed=11)
  arch = VIT.infer(flat, image_size=(grid[0] * 16, grid[1] * 16))
  hf.write_hf(tmp_path, flat, arch, class_names=['a', 'b', 'c', 'd', 'e'])
  model = verify.load_hf_model(str(tmp_path))  # Raises on any missing/unexpected key.
  assert model.config.id2label[4] == 'e' and model.config.hidden_act == 'gelu_pytorch_tanh'
  processor = transformers.AutoImageProcessor.from_pretrained(tmp_path)  # Pixels to [-1, 1].
  pixels = processor(images=np.full((20, 30, 3), 255, np.uint8), return_tensors='np')['pixel_values']
  assert pixels.shape == (1, 3, *arch.image_size) and np.allclose(pixels, 1.0)
  images = verify.sample_images(arch)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()
  ours = verify.our_logits(flat, arch, images)
  diff = assert_logits_match(ours, theirs)
  print(f'hf export {arch.image_size}: max |logit diff| {diff:.3g}')


def test_cli_verify_reports_the_difference(tmp_path, capsys):
  src = tmp_path / 'm.npz'
  write_npz(src, make_params('vit_jax', seed=12))
  from vit_jax.convert import __main__ as cli
  assert cli.main(['--input', str(src), '--to', 'hf', '--output', str(tmp_path / 'hf'),
                   '--verify']) == 0
  out = capsys.readouterr().out
  diff = float(out.rsplit('= ', 1)[1])
  assert diff <= 1e-4   # the README's absolute bound, on O(1) logits (make_params)


def _hf_model(**config):
  torch.manual_seed(0)
  cfg = transformers.ViTConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=HEADS,
                               intermediate_size=64, image_size=[16, 24], patch_size=4,
                               num_labels=3, **config)
  model = transformers.ViTForImageClassification(cfg).eval()
  with torch.no_grad():  # HF initialises LayerNorms to 1/0 and biases to 0: randomise everything.
    for p in model.parameters():
      p.normal_(0, 0.3)
  return model


def test_hf_directory_restores_here_with_the_same_logits(tmp_path):
  model = _hf_model(hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6,
                    id2label={0: 'x', 1: 'y', 2: 'z'})
  model.save_pretrained(tmp_path)
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.format == 'hf' and not ckpt.notes and ckpt.class_names == ['x', 'y', 'z']
  assert ckpt.architecture.image_size == (16, 24) and ckpt.architecture.num_classes == 3
  images = np.random.RandomState(0).uniform(-1, 1, (2, 16, 24, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).logits.numpy()
  ours = verify.our_logits(ckpt.params, ckpt.architecture, images)
  assert_logits_match(ours, theirs)
  # And back out through the converter: the same network again (the same O(1) logits).
  result = convert(tmp_path, 'hf', tmp_path / 'again', verify=True, log=None)
  assert result.max_abs_diff <= 1e-4


def test_exact_gelu_source_reads_as_exact_gelu(tmp_path):
  """transformers' defaults: exact GELU (the architecture's `act`, so logits match) and eps 1e-12
  (noted: this project's LayerNorm uses 1e-6)."""
  _hf_model().save_pretrained(tmp_path)
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.architecture.model_config['act'] == 'gelu'
  assert any('1e-12' in n for n in ckpt.notes)
