"""Export to and import from timm (CPU torch, timm through the library's torchvision stand-in)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.numerics import assert_logits_match
from tests import interop

# Skips where torch or timm cannot be imported; fails instead under scripts/test.sh.
torch, timm = interop.require_timm()

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
  diff = assert_logits_match(ours, _run(verify.load_timm_model(str(tmp_path)), images))
  print(f'timm export {classifier} {arch.image_size}: max |logit diff| {diff:.3g}')
  # ... and from the folder alone, through timm's local-dir source and its config.json.
  model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
  assert_logits_match(ours, _run(model, images), what='local-dir')
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
  assert_logits_match(verify.our_logits(flat, arch, images), _run(model, images))


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
  assert_logits_match(ours, _run(model, images))
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
  # The README's absolute bound (the model's logits are O(1), as checked in the tests above).
  assert float(capsys.readouterr().out.rsplit('= ', 1)[1]) <= 1e-4


@pytest.mark.parametrize('shift,code', [(2e-4, 1), (5e-5, 0)])
def test_cli_verify_fails_above_1e4(tmp_path, capsys, monkeypatch, shift, code):
  """A timm writer that moves every logit by `shift` (through the head bias): `--verify` exits 1
  (a failed step of the work, as the README says) above 1e-4 and 0 below it. The true export
  differs by ~2e-6 (logits O(1)), so the measured difference is `shift` to within 1e-5."""
  real = vit_interop.to_timm

  def shifted(flat, arch):
    sd, config = real(flat, arch)
    return {**sd, 'head.bias': sd['head.bias'] + np.float32(shift)}, config
  monkeypatch.setattr(vit_interop, 'to_timm', shifted)
  write_npz(tmp_path / 'm.npz', make_params('vit_jax', seed=24))
  from vit_jax.convert import __main__ as cli
  assert cli.main(['--input', str(tmp_path / 'm.npz'), '--to', 'timm', '--output',
                   str(tmp_path / 'timm'), '--verify']) == code
  out = capsys.readouterr()
  if code:
    assert 'error: --verify failed: largest |logit difference| 0.0002' in out.err, out.err
    assert out.err.rstrip().endswith('> 0.0001'), out.err
  else:
    diff = float(out.out.rsplit('= ', 1)[1])
    assert abs(diff - shift) <= 1e-5, diff


def test_timm_imports_through_the_stand_in_where_an_installed_torchvision_does_not_load(tmp_path):
  """PyPI's torchvision built for another torch fails at import ("operator torchvision::nms does not
  exist"); timm then imports through the stand-in, builds and runs a ViT, and no torchvision module
  (real or stand-in) is left for other libraries to find."""
  broken = tmp_path / 'torchvision'
  broken.mkdir()
  (broken / '__init__.py').write_text(
      "raise RuntimeError('operator torchvision::nms does not exist')\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, torch\n'
          'from vit_jax.convert.torchvision_stub import import_timm, torchvision_loads\n'
          'assert not torchvision_loads()\n'
          'timm = import_timm()\n'
          "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=32,\n"
          '                      num_classes=3)\n'
          'print(tuple(m(torch.zeros(2, 3, 32, 32)).shape))\n'
          "print(sorted(n for n in sys.modules if n.split('.')[0] == 'torchvision'))\n")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{root}'),
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split('\n')[:2] == ['(2, 3)', '[]']
