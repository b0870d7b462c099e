"""Every registered family and model, tested by registering (as timm's test_models does).

A family gets these tests by being registered: the exact parameter count of every named model from
shapes alone, and for each family's tiny `test_model`: init, forward and feature shapes, one real
jitted train step, a save/restore through this project's checkpoint, the export round trips it
supports, and tensor-parallel rules that leave no large parameter silently replicated. The 8-device
equivalence of data, FSDP and tensor meshes is in tests/test_sharding.py.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import sharding as sharding_lib
from vit_jax.checkpoints import read_checkpoint
from vit_jax.checkpoints import manager
from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.formats import timm as timm_format
from vit_jax.models import params as params_lib
from vit_jax.summary import param_shapes
from vit_jax.train import optim, state as state_lib, step as step_lib

# timm's / the papers' counts at 1000 classes and 224x224 (Swin-B_384 at 384x384, the RoPE ViT and
# ViT-Little at 256x256, DINOv2 at 518x518).
EXPECTED_COUNTS = {
    'ViT-Ti_16': 5_717_416, 'ViT-S_16': 22_050_664, 'ViT-S_32': 22_878_952,
    'ViT-B_16': 86_567_656, 'ViT-B_32': 88_224_232, 'ViT-B_8': 86_576_872,
    'ViT-L_16': 304_326_632, 'ViT-L_32': 306_535_400, 'ViT-H_14': 632_045_800,
    'R+ViT-Ti_16': 6_337_704, 'R26+ViT-S_32': 36_431_912, 'R50+ViT-B_16': 98_659_112,
    'R50+ViT-L_32': 328_994_856,
    'Mixer-S_16': 18_528_264, 'Mixer-S_32': 19_104_624, 'Mixer-B_16': 59_880_472,
    'Mixer-B_32': 60_293_428, 'Mixer-L_16': 208_196_168, 'Mixer-L_32': 206_939_264,
    'DeiT-Ti_16-distilled': 5_910_800, 'DeiT-S_16-distilled': 22_436_432,
    'DeiT-B_16-distilled': 87_338_192,
    'Swin-T': 28_288_354, 'Swin-S': 49_606_258, 'Swin-B': 87_768_224, 'Swin-L': 196_532_476,
    'Swin-B_384': 87_903_584,
    'PVTv2-b0': 3_666_760, 'PVTv2-b1': 14_009_000, 'PVTv2-b2': 25_362_856,
    'PVTv2-b2_li': 22_553_512, 'PVTv2-b3': 45_238_696, 'PVTv2-b4': 62_556_072,
    'PVTv2-b5': 81_956_008,
    'EVA02-Ti_14': 5_695_144, 'EVA02-S_14': 22_006_120, 'ViT-B_16-rope-reg1-gap': 86_425_576,
    'BEiTv2-B_16': 86_530_984,
    # The ViT family's later variants (timm 1.0.31's counts at timm's input size).
    'DeiT3-S_16': 22_059_496, 'DeiT3-B_16': 86_585_320,
    'DINOv2-S_14': 22_441_192, 'DINOv2-S_14-reg4': 22_442_344, 'DINOv2-B_14-reg4': 87_351_016,
    'SigLIP-B_16': 93_653_224, 'SigLIP-B_16-gap': 86_566_120,
    'ViT-Little_16-reg4-gap': 22_516_008, 'FlexiViT-S': 22_061_416,
}
IMAGE_SIZE = {'Swin-B_384': 384, 'ViT-B_16-rope-reg1-gap': 256, 'DINOv2-S_14': 518,
              'DINOv2-S_14-reg4': 518, 'DINOv2-B_14-reg4': 518, 'ViT-Little_16-reg4-gap': 256,
              'FlexiViT-S': 240}
FAMILIES = ('vit', 'deit', 'hybrid', 'mixer', 'swin', 'pvt', 'eva', 'beit')
CLASSES = 5


def test_every_family_is_registered():
  assert [f.name for f in registry.families()] == list(FAMILIES)


def test_the_issue_names_are_registered():
  assert set(EXPECTED_COUNTS) <= set(registry.names())


@pytest.mark.parametrize('name', registry.names())
def test_exact_parameter_count(name):
  """From shapes alone (jax.eval_shape): nothing is allocated, so the largest models are cheap."""
  family = registry.family_of(name)
  size = IMAGE_SIZE.get(name, 224)
  model = family.create(registry.get_model_config(name), 1000)
  count = params_lib.count(param_shapes(model, (size, size)))
  if name in EXPECTED_COUNTS:
    assert count == EXPECTED_COUNTS[name]
  else:  # CPU-sized and test models only; every large model must be pinned above.
    assert 0 < count < 5_000_000, (name, count)
  macs = family.forward_macs(dict(registry.get_model_config(name)), 1000, (size, size))
  assert macs > count  # every weight is used at least once per image


def _family_ids():
  return [f.name for f in registry.families()]


@pytest.fixture(params=_family_ids())
def tiny(request):
  """(family, fields, model, params, images) of the family's test model."""
  family = registry.get_family(request.param)
  assert family.test_model in registry.names(family.name), (
      f'family {family.name} must name one of its own tiny models as test_model')
  fields = dict(registry.get_model_config(family.test_model), head_zeroinit=False)
  model = family.create(fields, CLASSES)
  s = family.test_image_size
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, s, s, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)['params']
  return family, fields, model, params, images


def test_forward_and_feature_shapes(tiny):
  family, fields, model, params, images = tiny
  logits = model.apply({'params': params}, images)
  assert logits.shape == (2, CLASSES) and bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.std(logits)) > 0
  feats = model.apply({'params': params}, images, features=True)
  assert isinstance(feats, (list, tuple)) and feats
  for f in feats:  # [B, h, w, C] maps, coarser or equal to the input
    assert f.ndim == 4 and f.shape[0] == 2 and f.shape[1] <= images.shape[1]
  with pytest.raises(ValueError):
    family.validate(fields, (images.shape[1] + 1, images.shape[2]))


def test_one_train_step_lowers_the_loss_on_its_batch(tiny):
  family, _, model, params, images = tiny
  del params
  mesh = sharding_lib.make_mesh((('data', -1),))
  schedule = optim.make_schedule(1e-2, 10)
  tx = optim.make_optimizer(dict(optimizer='adam', grad_clip_norm=1.0, weight_decay=0.0), schedule)
  state, shardings = state_lib.create_train_state(
      model, tx, (1, *images.shape[1:]), 0, mesh, tensor_rules=family.tensor_rules)
  step = step_lib.make_train_step(model, tx, schedule, mesh, shardings)
  batch = {'image': images, 'labels': jax.nn.one_hot(jnp.array([1, 3]), CLASSES)}
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 4 and all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


def test_save_restore_and_export_round_trips(tiny, tmp_path):
  family, fields, model, params, images = tiny
  s = family.test_image_size
  arch = Architecture(dict(fields), CLASSES, (s, s), 3, family.name)
  ref = np.asarray(model.apply({'params': params}, images))
  flat = {k: np.asarray(v) for k, v in params_lib.flatten(family.to_file_layout(params)).items()}
  # This project's checkpoint: the architecture travels in the metadata.
  manager.save_params(str(tmp_path / 'run'), params, {'architecture': arch.to_meta()})
  ckpt = read_checkpoint(tmp_path / 'run')
  assert ckpt.architecture.family == family.name
  assert sorted(ckpt.params) == sorted(flat)
  assert all(ckpt.params[k].tobytes() == flat[k].tobytes() for k in flat)
  back = ckpt.architecture.create_model()
  tree = family.to_module_layout(params_lib.unflatten(ckpt.params), ckpt.architecture.model_config)
  np.testing.assert_array_equal(np.asarray(back.apply({'params': tree}, images)), ref)
  # The architecture is read back off the parameters alone.
  assert registry.detect(flat).name == family.name
  inferred = family.infer(flat, image_size=(s, s))
  assert inferred.num_classes == CLASSES
  # timm: to_timm -> from_timm is bitwise where the family has a timm counterpart.
  try:
    state, config = registry.interop(family).to_timm(flat, arch)
  except ValueError as e:
    assert re.search('timm', str(e)), e  # a refusal must say why
    return
  timm_format.write_timm(tmp_path / 'timm', flat, arch)
  again = read_checkpoint(tmp_path / 'timm')
  assert again.architecture.family == family.name
  assert sorted(again.params) == sorted(flat)
  for k in flat:
    np.testing.assert_array_equal(again.params[k], flat[k].astype(np.float32), err_msg=k)
  assert set(state) and config['architecture']


def test_tensor_rules_leave_no_large_parameter_silently_replicated(tiny):
  """Every matrix parameter (two or more dimensions above 1) is either split over `tensor` by a
  rule or named by a rule as deliberately replicated (patch embedding, position table, head): none
  falls through. Vectors (biases, norms, a class token [1, 1, D]) stay replicated by design."""
  family, _, model, params, images = tiny
  del model, images
  unmatched = []
  for path, leaf in params_lib.flatten(params).items():
    if sum(d > 1 for d in np.shape(leaf)) < 2:
      continue
    rule = next((r for pattern, r in family.tensor_rules if re.search(pattern, path)), None)
    if rule is None:
      unmatched.append(path)
  assert not unmatched, f'{family.name}: no tensor rule for {unmatched}'
  # And on a tensor=2 mesh, the rules really split something.
  mesh = jax.sharding.AbstractMesh((1, 1, 2), sharding_lib.AXES)
  shardings = sharding_lib.tree_shardings(params, mesh, 2 ** 30, family.tensor_rules)
  split = [p for p, s in sharding_lib.describe(shardings).items() if 'tensor' in s]
  assert split, f'{family.name}: nothing split over tensor'
