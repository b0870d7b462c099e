"""Export to and import from timm (CPU torch, timm through a test-only torchvision stand-in)."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
from tests.torchvision_stub import import_timm  # noqa: E402

try:
  timm = import_timm()
except Exception as e:  # pylint: disable=broad-except
  pytest.skip(f'timm cannot be imported here, even through tests/torchvision_stub: {e}',
              allow_module_level=True)

from safetensors.numpy import load_file  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tests.test_npz import D, HEADS, make_params  # noqa: E402
from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.families.vit import FAMILY as VIT  # noqa: E402
from vit_jax.checkpoints.npz import write_npz  # noqa: E402
from vit_jax.convert import convert, verify  # noqa: E402
from vit_jax.families import vit_interop  # noqa: E402
from vit_jax.formats import timm as timm_lib  # noqa: E402


def _run(model, images):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize('classifier,grid', [('token', (4, 4)), ('gap', (4, 6)), ('map', (6, 4))])
def test_export_to_timm_matches_logits(tmp_path, classifier, grid):
  flat = make_params('vit_jax', classifier=classifier, grid=grid, seed=21)
  arch = VIT.infer(flat, image_size=(grid[0] * 4, grid[1] * 4))
  timm_lib.write_timm(tmp_path, flat, arch, class_names=list('abcde'))
  images = verify.sample_images(arch)
  ours = verify.our_logits(flat, arch, images)
  # As the brief's users would: create_model + pretrained_cfg_overlay(file=...) (strict loading) ...
  diff = np.abs(ours - _run(verify.load_timm_model(str(tmp_path)), images)).max()
  print(f'timm export {classifier} {arch.image_size}: max |logit diff| {diff:.3g}')
  assert diff <= 1e-4 and np.abs(ours).max() > 0.1
  # ... and from the folder alone, through timm's local-dir source and its config.json.
  model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
  assert np.abs(ours - _run(model, images)).max() <= 1e-4
  assert model.pretrained_cfg['label_names'] == list('abcde')


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_npz_export_loads_in_timm(tmp_path, classifier):
  """`--to npz` writes Google's layout, which timm's own .npz loader (`load_pretrained`) reads."""
  flat = make_params('vit_jax', classifier=classifier, seed=22)
  write_npz(tmp_path / 'm.npz', flat)
  convert(tmp_path / 'm.npz', 'npz', tmp_path / 'out.npz', log=None)
  arch = VIT.infer(flat)
  model = timm.create_model('vit_base_patch16_224', pretrained=False,
                            **vit_interop.to_timm(flat, arch)[1]['model_args']).eval()
  model.load_pretrained(str(tmp_path / 'out.npz'))
  images = verify.sample_images(arch)
  assert np.abs(verify.our_logits(flat, arch, images) - _run(model, images)).max() <= 1e-4


@pytest.mark.parametrize('global_pool', ['token', 'avg', 'map'])
def test_timm_checkpoint_restores_here_with_the_same_logits(tmp_path, global_pool):
  torch.manual_seed(0)
  args = dict(img_size=(12, 20), patch_size=4, embed_dim=D, depth=2, num_heads=HEADS, mlp_ratio=2.0,
              num_classes=3, global_pool=global_pool, class_token=global_pool == 'token',
              fc_norm=False, act_layer='gelu_tanh')
  model = timm.create_model('vit_base_patch16_224', pretrained=False, **args).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.3)
  save_file(model.state_dict(), str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text(json.dumps(dict(
      architecture='vit_base_patch16_224', num_classes=3,
      model_args={**args, 'img_size': [12, 20]})))
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.format == 'timm' and ckpt.architecture.image_size == (12, 20)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 12, 20, 3)).astype(np.float32)
  ours = verify.our_logits(ckpt.params, ckpt.architecture, images)
  assert np.abs(ours - _run(model, images)).max() <= 1e-4
  # timm -> ours -> timm is bitwise.
  timm_lib.write_timm(tmp_path / 'again', ckpt.params, ckpt.architecture)
  back = load_file(tmp_path / 'again' / 'model.safetensors')
  theirs = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(back) == sorted(theirs)
  assert all(back[k].tobytes() == theirs[k].tobytes() for k in back)


def test_cli_verify_timm(tmp_path, capsys):
  write_npz(tmp_path / 'm.npz', make_params('vit_jax', classifier='map', seed=23))
  from vit_jax.convert import __main__ as cli
  assert cli.main(['--input', str(tmp_path / 'm.npz'), '--to', 'timm', '--output',
                   str(tmp_path / 'timm'), '--verify']) == 0
  assert float(capsys.readouterr().out.rsplit('= ', 1)[1]) <= 1e-4
