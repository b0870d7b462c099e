"""Every family with a timm counterpart, end to end through `python -m vit_jax.predict`: a timm
checkpoint directory (config.json + model.safetensors) that declares ImageNet normalisation gives
timm's own logits within 1e-4 for an image file (torch and timm from the dev requirements; timm
imports through vit_jax/convert/torchvision_stub)."""
from __future__ import annotations

import jax
import numpy as np
from PIL import Image
import pytest

from tests.numerics import assert_logits_match
from tests import interop

torch, timm = interop.require_timm()  # under scripts/test.sh a failure, not a skip

from vit_jax import predict  # noqa: E402
from vit_jax.families import registry  # noqa: E402
from vit_jax.families.base import IMAGENET, Architecture  # noqa: E402
from vit_jax.formats import timm as timm_format  # noqa: E402
from vit_jax.models import params as params_lib  # noqa: E402

# (model, image size, field overrides) that timm can express exactly, one per family. timm's Mixer
# and PVT have only the exact GELU; its hybrids only its registered ResNets.
CASES = {
    'vit': ('ViT-testing', 16, {}),
    'deit': ('DeiT-testing', 16, {}),
    'hybrid': ('R+ViT-Ti_16', 64, {'num_layers': 2}),
    'mixer': ('Mixer-S_32', 64, {'act': 'gelu'}),
    'swin': ('Swin-testing', 32, {}),
    'pvt': ('PVTv2-tiny', 32, {}),
}


def test_every_family_with_a_timm_counterpart_is_covered():
  readers = {f.name for f in registry.families() if registry.interop(f).timm_prefixes}
  assert readers == set(CASES)


@pytest.mark.parametrize('family_name', sorted(CASES))
def test_timm_directory_through_predict_gives_timms_logits(family_name, tmp_path):
  name, size, overrides = CASES[family_name]
  family = registry.get_family(family_name)
  fields = {**registry.get_model_config(name), 'head_zeroinit': False, **overrides}
  model = family.create(fields, 4)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32))['params']
  # Perturb so that the logits are O(1): 1e-4 then means something.
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(tree, [np.asarray(l) + rng.normal(0, 0.05, np.shape(l)).astype(
      np.float32) for l in leaves])
  flat = params_lib.flatten_numpy(family.to_file_layout(params))
  arch = Architecture(dict(fields), 4, (size, size), 3, family_name, *IMAGENET)
  timm_format.write_timm(tmp_path / 'timm', flat, arch, class_names=list('abcd'))

  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.main(['--checkpoint', str(tmp_path / 'timm'), str(tmp_path / 'x.png'),
                       '--logits_out', str(tmp_path / 'logits.npy')]) == 0
  ours = np.load(tmp_path / 'logits.npy')

  theirs_model = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
  mean, std = (np.asarray(v, np.float32) for v in IMAGENET)
  pixels = (image.astype(np.float32) / 255.0 - mean) / std
  with torch.no_grad():
    theirs = theirs_model(torch.from_numpy(pixels.transpose(2, 0, 1)[None].copy())).numpy()
  diff = assert_logits_match(ours, theirs)  # logits >= 500x the bound: not a vacuous comparison
  print(f'{family_name}: max |logit diff| through predict {diff:.3g}')
