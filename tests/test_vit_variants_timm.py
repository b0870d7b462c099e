"""The later ViTs (DeiT III, DINOv2 with and without registers, SigLIP with MAP and GAP heads,
ViT-Little with registers and fc_norm, FlexiViT) against timm 1.0: a randomly initialised and
perturbed timm model of a tiny config of the same architecture class, saved as timm saves it
(`save_for_hf`: config.json with only the arguments given on top of the architecture's defaults, plus
model.safetensors), read through `python -m vit_jax.predict` with the checkpoint's own normalisation
gives timm's logits within 1e-4; `--to timm` writes it back bitwise and timm loads the result with
the same logits. The call-time image size and the intermediate layers are compared with timm's
`dynamic_img_size=True` and `forward_intermediates`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
import pytest

from tests import interop
from tests.numerics import assert_close_to_scale, assert_logits_match

torch, timm = interop.require_timm()  # under scripts/test.sh a failure, not a skip

from safetensors.numpy import load_file  # noqa: E402

from vit_jax import predict  # noqa: E402
from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.convert import convert, verify  # noqa: E402
from vit_jax.formats import timm as timm_format  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3)
# timm architecture -> (image size of the tiny model, the normalisation its pretrained_cfg declares,
# what our reader must find). Patch 14 at 42 px: a 3x3 grid.
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CASES = {
    'deit3_small_patch16_224': (32, IMAGENET, dict(classifier='token', layer_scale=1e-6,
                                                   no_embed_class=True, num_registers=0)),
    'vit_small_patch14_dinov2': (42, IMAGENET, dict(classifier='token', layer_scale=1e-5,
                                                    no_embed_class=False, num_registers=0)),
    'vit_small_patch14_reg4_dinov2': (42, IMAGENET, dict(classifier='token', num_registers=4,
                                                         no_embed_class=True)),
    'vit_base_patch16_siglip_224': (32, HALF, dict(classifier='map', layer_scale=None)),
    'vit_base_patch16_siglip_gap_224': (32, HALF, dict(classifier='gap', fc_norm=False)),
    'vit_little_patch16_reg4_gap_256': (32, HALF, dict(classifier='gap', fc_norm=True,
                                                       num_registers=4, no_embed_class=True)),
    'flexivit_small': (32, HALF, dict(classifier='token', no_embed_class=True, num_registers=0,
                                      act='gelu')),
}


def perturbed_timm(architecture: str, size: int, seed: int = 0, **extra):
  """timm's tiny model of this architecture with every parameter moved by N(0, 0.3) noise (and the
  LayerScale gammas, which start at 1e-5, set to O(1) values), in eval mode."""
  torch.manual_seed(seed)
  model = timm.create_model(architecture, pretrained=False, img_size=size, **TINY, **extra).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.3)
      if name.endswith('.gamma'):
        p.add_(0.5)
  return model


def save_as_timm(model, path) -> None:
  from timm.models._hub import save_for_hf  # pylint: disable=import-outside-toplevel
  save_for_hf(model, str(path), safe_serialization=True)


def timm_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize('architecture', sorted(CASES))
def test_timm_directory_gives_timms_logits_and_goes_back(architecture, tmp_path):
  size, (mean, std), expect = CASES[architecture]
  model = perturbed_timm(architecture, size)
  save_as_timm(model, tmp_path / 'timm')
  ckpt = read_checkpoint(tmp_path / 'timm')
  fields = ckpt.architecture.model_config
  defaults = dict(num_registers=0, no_embed_class=False, fc_norm=False, layer_scale=None)
  assert {k: fields.get(k, defaults.get(k)) for k in expect} == expect, fields
  assert (ckpt.architecture.mean, ckpt.architecture.std) == (mean, std)
  assert ckpt.architecture.image_size == (size, size)

  # predict: an image file, the checkpoint's own normalisation.
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.main(['--checkpoint', str(tmp_path / 'timm'), str(tmp_path / 'x.png'),
                       '--logits_out', str(tmp_path / 'logits.npy')]) == 0
  pixels = (image.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
  theirs = timm_logits(model, pixels[None])
  diff = assert_logits_match(np.load(tmp_path / 'logits.npy'), theirs, what=architecture)
  print(f'{architecture}: max |logit diff| through predict {diff:.3g}')

  # convert --to timm: the same state dict bitwise, and timm's loader gives the same logits.
  convert(tmp_path / 'timm', 'timm', tmp_path / 'back', log=None)
  back = load_file(tmp_path / 'back' / 'model.safetensors')
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert sorted(back) == sorted(state)
  assert all(back[k].tobytes() == state[k].tobytes() for k in back)
  again = timm.create_model(f'local-dir:{tmp_path / "back"}', pretrained=True).eval()
  images = verify.sample_images(ckpt.architecture)
  assert_logits_match(timm_logits(again, images), timm_logits(model, images), what='local-dir')


@pytest.mark.parametrize('architecture', ['vit_small_patch14_dinov2',
                                          'vit_small_patch14_reg4_dinov2'])
def test_dynamic_img_size_gives_timms_logits_at_other_sizes(architecture, tmp_path):
  """A timm model with dynamic_img_size=True (bicubic, antialiased resampling of its table) read
  here runs at other sizes with timm's logits: the reader sets dynamic_resize='bicubic', the
  checkpoint transfer's antialiased bicubic (`families/resample.py`), which is torch's."""
  model = perturbed_timm(architecture, 42, seed=2, dynamic_img_size=True)
  save_as_timm(model, tmp_path)
  ckpt = read_checkpoint(tmp_path)
  fields = ckpt.architecture.model_config
  assert fields['dynamic_img_size'] and fields['dynamic_resize'] == 'bicubic'
  ours = ckpt.architecture.create_model()
  for h, w in ((28, 56), (70, 42), (14, 14)):  # up, mixed, down to one patch
    images = np.random.RandomState(h).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
    got = verify.our_logits(ckpt.params, ckpt.architecture, images)
    diff = assert_logits_match(got, timm_logits(model, images), what=f'{h}x{w}')
    print(f'{architecture} dynamic at {h}x{w}: max |logit diff| {diff:.3g}')
  del ours


@pytest.mark.parametrize('architecture,indices,norm', [
    ('vit_small_patch14_reg4_dinov2', [0, 1], False),
    ('vit_small_patch14_reg4_dinov2', [-1], True),
    ('vit_base_patch16_siglip_224', [0, -1], True),
    ('vit_little_patch16_reg4_gap_256', [1], True),
])
def test_intermediates_equal_timms_forward_intermediates(architecture, indices, norm, tmp_path):
  size = CASES[architecture][0]
  model = perturbed_timm(architecture, size, seed=3)
  save_as_timm(model, tmp_path)
  ckpt = read_checkpoint(tmp_path)
  images = verify.sample_images(ckpt.architecture)
  with torch.no_grad():
    theirs = model.forward_intermediates(
        torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), indices=indices, norm=norm,
        output_fmt='NCHW', return_prefix_tokens=True, intermediates_only=True)
  got = intermediates_of(ckpt, images, indices, norm)
  prefix = ckpt.architecture.get_family().num_prefix(ckpt.architecture.model_config)
  assert len(got['maps']) == len(theirs)
  for i, item in enumerate(theirs):
    spatial, tokens = item if prefix else (item, None)
    assert_close_to_scale(got['maps'][i], spatial.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                          what=f'map {indices[i]}')
    if prefix:
      assert got['prefix'][i].shape == (2, prefix, 32)
      assert_close_to_scale(got['prefix'][i], tokens.numpy(), rtol=1e-5, what='prefix')
    else:
      assert got['prefix'][i].shape == (2, 0, 32)


def intermediates_of(ckpt, images, indices, norm, drop_prefix=False):
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  model = ckpt.architecture.create_model()
  params = params_lib.unflatten(dict(ckpt.params))
  with jax.default_matmul_precision('highest'):
    out = model.apply({'params': params}, images, intermediates=tuple(indices), norm=norm,
                      drop_prefix=drop_prefix)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize('family_name', ['deit', 'hybrid'])
def test_deit_and_hybrid_intermediates_equal_timms(family_name, tmp_path):
  """The families that reuse the ViT's encoder: a DeiT's prefix holds the class and distillation
  tokens; the hybrid's maps lie on the ResNet's grid. Our perturbed tiny model exported with
  `--to timm`, loaded by timm, against its `forward_intermediates`."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  name, size, extra = {'deit': ('DeiT-testing', 16, {}),
                       'hybrid': ('R+ViT-Ti_16', 64, {'num_layers': 2})}[family_name]
  family = registry.get_family(family_name)
  fields = {**registry.get_model_config(name), 'head_zeroinit': False, **extra}
  params = family.create(fields, 3).init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3)))
  leaves, tree = jax.tree.flatten(params['params'])
  rng = np.random.default_rng(4)
  params = jax.tree.unflatten(tree, [np.asarray(l) + rng.normal(0, 0.05, l.shape).astype(np.float32)
                                     for l in leaves])
  flat = params_lib.flatten_numpy(family.to_file_layout(params))
  arch = Architecture(dict(fields), 3, (size, size), 3, family_name)
  timm_format.write_timm(tmp_path, flat, arch)
  model = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
  ckpt = read_checkpoint(tmp_path)
  images = verify.sample_images(ckpt.architecture)
  for norm in (False, True):
    with torch.no_grad():
      theirs = model.forward_intermediates(
          torch.from_numpy(images.transpose(0, 3, 1, 2).copy()), indices=[0, 1], norm=norm,
          return_prefix_tokens=True, intermediates_only=True)
    got = intermediates_of(ckpt, images, (0, -1), norm)
    for i, (spatial, tokens) in enumerate(theirs):
      assert_close_to_scale(got['maps'][i], spatial.numpy().transpose(0, 2, 3, 1), rtol=1e-5,
                            what=f'{family_name} map {i} norm={norm}')
      assert_close_to_scale(got['prefix'][i], tokens.numpy(), rtol=1e-5, what='prefix')
    assert got['prefix'][0].shape[1] == (2 if family_name == 'deit' else 1)


@pytest.mark.slow
def test_finetune_from_a_timm_dinov2_directory_at_another_resolution(tmp_path):
  """`configs/finetune.py:model=DINOv2-S_14-reg4,pretrained=DIR` with a timm directory of a tiny
  DINOv2 with registers at 42 px (a 3x3 table, DINOv2's 37x37 at 518 in small), fine-tuned at 28 px
  (2x2) on grey digits: the log names the table's resampling, and at lr 1e-9 the saved parameters
  are the file's: registers and LayerScale as written, the table resampled (bilinear, no prefix
  rows: no_embed_class), the patch kernel summed over colour, a new head."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from tests.sharding_worker import worker_env  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints.manager import load_params  # pylint: disable=import-outside-toplevel
  from vit_jax.families import resample  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  model = perturbed_timm('vit_small_patch14_reg4_dinov2', 42, seed=5)
  save_as_timm(model, tmp_path / 'dinov2')
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = ['--config=configs/finetune.py:model=DINOv2-S_14-reg4,dataset=digits,'
          f'pretrained={tmp_path / "dinov2"}', '--config.model.hidden_size=32',
          '--config.model.num_layers=2', '--config.model.num_heads=2', '--config.model.mlp_dim=128',
          '--config.image_size=28', '--config.channels=1', '--config.batch_size=8',
          '--config.total_steps=1', '--config.warmup_steps=0', '--config.base_lr=1e-9',
          '--config.eval_every=0', '--config.checkpoint_every=1', '--config.augment=resize',
          '--config.progress=False']
  out = subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "w"}', *args],
                       cwd=root, capture_output=True, text=True, timeout=900, env=worker_env())
  assert out.returncode == 0, out.stderr[-4000:]
  assert '(timm)' in out.stderr and 'grid 3x3 -> 2x2 (bilinear)' in out.stderr, out.stderr[-3000:]
  assert 'added    head/kernel' in out.stderr and 'added    registers' not in out.stderr
  got = params_lib.flatten_numpy(load_params(str(tmp_path / 'w'))[0])
  want = {'registers': state['reg_token'],
          'Transformer/encoderblock_1/LayerScale_3/scale': state['blocks.1.ls2.gamma'],
          POSEMB: resample.resample_posemb(state['pos_embed'], (2, 2), num_prefix=0,
                                           old_grid=(3, 3), method='bilinear'),
          'embedding/kernel': state['patch_embed.proj.weight'].transpose(2, 3, 1, 0).sum(
              axis=2, keepdims=True)}
  for key, value in want.items():
    assert got[key].shape == value.shape, key
    assert_close_to_scale(got[key], value, rtol=1e-6, what=key)
  assert got['head/kernel'].shape == (32, 10)
  print('\n'.join(l for l in out.stderr.splitlines() if 'pos_embedding' in l or 'loaded' in l))


POSEMB = 'Transformer/posembed_input/pos_embedding'
