"""The EVA family against timm 1.0's `Eva`: tiny models of the registered architectures, built by
timm's own factory (`timm.create_model(<registered name>, **smaller sizes)`), perturbed and saved as
timm saves them (`save_for_hf`: config.json with only the overridden `model_args`), read back here
through `predict` with their own normalisation, written back with `convert --to timm`, run at other
image sizes (`dynamic_img_size`), and asked for intermediate layers."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests import interop
from tests.numerics import assert_close_to_scale, assert_logits_match

torch, timm = interop.require_timm()

from timm.models import save_for_hf  # noqa: E402

from vit_jax import predict  # noqa: E402
from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.checkpoints.pretrained import adapt_params  # noqa: E402
from vit_jax.convert import convert  # noqa: E402
from vit_jax.families import registry  # noqa: E402
from vit_jax.models import params as params_lib  # noqa: E402
from vit_jax.models import tokens as tokens_lib  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=5)
# (timm architecture, overrides of its registered arguments, image size): one per registered
# architecture, plus the options they do not use (class-token pooling, registers without a table
# row, a non-square grid, EVA-02 B/L's separate q/k/v and MLP sub-norm, the attention sub-norm).
CASES = {
    'eva02_tiny': ('eva02_tiny_patch14_224', dict(img_size=28, patch_size=7, ref_feat_shape=(4, 4)),
                   (28, 28)),
    'eva02_base': ('eva02_base_patch14_224', dict(img_size=28, patch_size=7, ref_feat_shape=(4, 4),
                                                  scale_attn_inner=True), (28, 28)),
    'rope_reg1_gap': ('vit_base_patch16_rope_reg1_gap_256', dict(img_size=32, patch_size=8,
                                                                  ref_feat_shape=(4, 4)), (32, 32)),
    'token_reg2': ('eva02_tiny_patch14_224', dict(
        img_size=(21, 35), patch_size=7, global_pool='token', num_reg_tokens=2, no_embed_class=True,
        ref_feat_shape=(3, 5)), (21, 35)),
}


def perturb(model, scale: float = 0.1, seed: int = 0):
  """Noise on every parameter (LayerScale gammas, norms, registers, tables included), so that the
  logits are O(1) and every parameter matters: 1e-4 then means something."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * scale)
  return model.eval()


def timm_model(name: str, overrides: dict, **extra):
  return perturb(timm.create_model(name, pretrained=False, **TINY, **overrides, **extra))


def run_timm(model, pixels: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())).numpy()


def normalised(image: np.ndarray, model) -> np.ndarray:
  """uint8 [H, W, 3] -> the [1, H, W, 3] float input with the timm model's own mean and std."""
  cfg = model.pretrained_cfg
  mean, std = (np.asarray(cfg[k], np.float32) for k in ('mean', 'std'))
  return ((image.astype(np.float32) / 255.0 - mean) / std)[None]


def predict_logits(checkpoint, image: np.ndarray, tmp_path) -> np.ndarray:
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.main(['--checkpoint', str(checkpoint), str(tmp_path / 'x.png'),
                       '--logits_out', str(tmp_path / 'logits.npy')]) == 0
  return np.load(tmp_path / 'logits.npy')


@pytest.mark.parametrize('case', sorted(CASES))
def test_timm_directory_in_and_out_with_timms_logits(case, tmp_path):
  name, overrides, size = CASES[case]
  model = timm_model(name, overrides)
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)
  theirs = run_timm(model, normalised(image, model))
  ours = predict_logits(tmp_path / 'timm', image, tmp_path)  # its CLIP / 0.5 normalisation
  diff = assert_logits_match(ours, theirs)
  ckpt = read_checkpoint(tmp_path / 'timm')
  assert ckpt.architecture.family == 'eva' and ckpt.architecture.image_size == size
  # `convert --to timm` writes a directory timm loads with the same logits.
  convert(tmp_path / 'timm', 'timm', tmp_path / 'back', log=None)
  again = timm.create_model(f'local-dir:{tmp_path / "back"}', pretrained=True).eval()
  back = assert_logits_match(ours, run_timm(again, normalised(image, again)), what='convert')
  print(f'{case}: max |logit diff| timm -> predict {diff:.3g}, convert --to timm {back:.3g}')


def test_registered_names_map_to_their_timm_architectures():
  """Each registered EVA is timm's architecture of the same name: its timm export names it, and
  timm builds from the exported arguments a model with the registered parameter count."""
  from vit_jax.families import eva_interop
  from vit_jax.summary import param_shapes
  for ours, theirs, size in (('EVA02-Ti_14', 'eva02_tiny_patch14_224', 224),
                             ('ViT-B_16-rope-reg1-gap', 'vit_base_patch16_rope_reg1_gap_256', 256)):
    fields = dict(registry.get_model_config(ours))
    family = registry.family_of(ours)
    count = params_lib.count(param_shapes(family.create(fields, 1000), (size, size)))
    args = eva_interop.timm_args(fields, 1000, (size, size))
    with torch.device('meta'):
      model = timm.create_model(theirs, pretrained=False, **args)
    assert sum(p.numel() for p in model.parameters()) == count, ours
    # and the registered defaults of that name (TIMM_ARCHS) say the same as timm's factory
    known = eva_interop.fields_from_args(eva_interop.TIMM_ARCHS[theirs][0])
    assert all(known[k] == v for k, v in fields.items() if k in known), ours


def _read(tmp_path, model):
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  return read_checkpoint(tmp_path / 'timm')


def test_call_time_image_size_equals_timm_and_a_model_built_at_that_size(tmp_path):
  """A model built at 28 px runs at 35x49 and 21x42 with its table resampled and RoPE recomputed
  inside one jitted function (compiled once per shape): timm's `dynamic_img_size=True` logits, and
  those of a model built at that size from the checkpoint moved there (`adapt_params`)."""
  name, overrides, _ = CASES['eva02_tiny']
  model = timm_model(name, overrides, dynamic_img_size=True)
  ckpt = _read(tmp_path, model)
  dyn = ckpt.architecture.create_model(dynamic_img_size=True)
  params = params_lib.unflatten(ckpt.params)
  fn = jax.jit(lambda p, x: dyn.apply({'params': p}, x))
  rng = np.random.default_rng(2)
  for size in ((35, 49), (21, 42), (35, 49)):
    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    ours = np.asarray(fn(params, x))
    assert_logits_match(ours, run_timm(model, x), what=f'timm dynamic {size}')
    if size != (35, 49) or fn._cache_size() == 2:  # pylint: disable=protected-access
      continue  # one size built and moved is enough (the second call at 35x49: compared already)
    fixed = ckpt.architecture.create_model(dynamic_img_size=False)
    init = jax.eval_shape(fixed.init, jax.random.PRNGKey(0), x)['params']
    moved, report = adapt_params(ckpt, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init),
                                 model=fixed,
                                 image_size=size)
    assert any('pos_embed' in r[0] for r in report.reshaped) and any(
        'rotary embedding' in n for n in report.notes), report.lines()
    built = np.asarray(fixed.apply({'params': moved}, x))
    np.testing.assert_allclose(ours, built, atol=1e-5, rtol=0)
  assert fn._cache_size() == 2  # pylint: disable=protected-access


@pytest.mark.parametrize('case,norm', [('token_reg2', True), ('rope_reg1_gap', False)])
def test_intermediate_layers_equal_timms(case, norm, tmp_path):
  name, overrides, size = CASES[case]
  model = timm_model(name, overrides)
  ckpt = _read(tmp_path, model)
  x = np.random.default_rng(3).normal(size=(2, *size, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                                         indices=[0, 1], norm=norm, return_prefix_tokens=True,
                                         intermediates_only=True)
  ours = ckpt.architecture.create_model().apply({'params': params_lib.unflatten(ckpt.params)}, x,
                                                intermediates=(0, -1), norm=norm)
  assert len(ours['maps']) == len(ours['prefix']) == 2
  for (fmap, prefix), m, p in zip(theirs, ours['maps'], ours['prefix']):
    assert_close_to_scale(m, fmap.numpy().transpose(0, 2, 3, 1), what='map')
    assert_close_to_scale(p, prefix.numpy(), what='prefix')
  patch = overrides['patch_size']
  grid = (size[0] // patch, size[1] // patch)
  assert ours['maps'][0].shape == (2, *grid, TINY['embed_dim'])
  assert ours['prefix'][0].shape == (2, model.num_prefix_tokens, TINY['embed_dim'])
  dropped = ckpt.architecture.create_model().apply(
      {'params': params_lib.unflatten(ckpt.params)}, x, intermediates=(1,), drop_prefix=True)
  assert set(dropped) == {'maps'}


def test_token_inputs_contract():
  """KEEP: all patches in a shuffled order give the full run's patch tokens in that order (RoPE and
  the table follow each kept patch) and the same pooled logits; PROMPTS: deep prompts leave the
  outputs' shapes and are counted in the attention maps; TOKEN_MASK: no masked patch changes
  nothing; TOKEN_MAP: registers come back as prefix tokens. (The edits themselves are
  `vit_jax.models.tokens`', shared by every family.)"""
  family = registry.get_family('eva')
  fields = dict(registry.get_model_config(family.test_model), head_zeroinit=False)
  model = family.create(fields, 5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  logits, aux = model.apply(params, x, return_aux=True)
  n, d = 16, fields['hidden_size']
  assert aux['prefix_tokens'].shape == (2, 2, d) and aux['patch_tokens'].shape == (2, n, d)
  perm = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), n) for i in (5, 6)])
  no_mask = jnp.zeros((2, n), bool)  # TOKEN_MASK with nothing masked: no change
  kept_logits, kept = model.apply(params, x, return_aux=True, tokens=tokens_lib.TokenInputs(
      keep=perm, mask=no_mask, mask_embedding=jnp.ones((d,))))
  want = jnp.take_along_axis(aux['patch_tokens'], perm[..., None], axis=1)
  np.testing.assert_allclose(kept['patch_tokens'], want, atol=2e-5)
  np.testing.assert_allclose(kept_logits, logits, atol=2e-5)
  # Deep prompts (block 0's are the shallow insertion; the others replace the prompt outputs).
  prompts = 3 * jax.random.normal(jax.random.PRNGKey(7), (fields['num_layers'], 3, d))
  out, paux = model.apply(params, x, return_aux=True,
                          tokens=tokens_lib.TokenInputs(prompts=prompts))
  assert paux['patch_tokens'].shape == (2, n, d) and out.shape == (2, 5)
  assert paux['attention_weights'].shape[-1] == 2 + 3 + n
  assert float(jnp.max(jnp.abs(out - logits))) > 1e-5  # float32 noise here: ~1e-7
  assert family.missing_capability([tokens_lib.TWO_HEADS])
  assert family.missing_capability([tokens_lib.KEEP, tokens_lib.PROMPTS]) is None


def test_hugging_face_export_is_refused_with_the_reason():
  from vit_jax.families.base import Architecture
  arch = Architecture(dict(registry.get_model_config('EVA-testing')), 5, (16, 16), 3, 'eva')
  with pytest.raises(ValueError, match='no EVA-02 or RoPE ViT architecture.*--to timm'):
    registry.interop('eva').to_hf({}, arch)


def test_unsupported_timm_options_are_refused_by_name(tmp_path):
  model = timm.create_model('eva02_tiny_patch14_224', pretrained=False, **TINY, img_size=28,
                            patch_size=7, rope_grid_indexing='xy')
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  with pytest.raises(ValueError, match="rope_grid_indexing='xy'"):
    read_checkpoint(tmp_path / 'timm')
  config = json.loads((tmp_path / 'timm' / 'config.json').read_text())
  assert config['architecture'] == 'eva02_tiny_patch14_224'


# The registered test models as timm builds them (the same fields: `EVA-testing`, `BEiT-testing`).
TEST_MODELS = {
    'eva': ('EVA-testing', 'eva02_tiny_patch14_224', dict(num_reg_tokens=1, init_values=0.1,
                                                          ref_feat_shape=(4, 4))),
    'beit': ('BEiT-testing', 'beitv2_base_patch16_224', dict(init_values=0.1)),
}


@pytest.mark.parametrize('family', ['eva', pytest.param('beit', marks=pytest.mark.slow)])
def test_finetune_recipe_from_a_timm_directory_at_another_resolution(family, tmp_path):
  """`configs/finetune.py:pretrained=<timm directory>` at 24 px from a 16 px checkpoint, through
  `python -m vit_jax.main`: the resolution-dependent tables resized and named in the log (EVA: the
  learned table and the RoPE grid; BEiT: every block's relative table), a new head; it trains.
  (BEiT's is slow-marked: tests/test_beit.py checks its table transfer and report without main.)"""
  import subprocess
  import sys
  from tests.sharding_worker import worker_env
  name, arch, extra = TEST_MODELS[family]
  model = timm_model(arch, dict(img_size=16, patch_size=4, mlp_ratio=2.0, **extra))
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "ft"}',
         f'--config=configs/finetune.py:model={name},dataset=digits,pretrained={tmp_path / "timm"}',
         '--config.image_size=24', '--config.batch_size=32', '--config.total_steps=4',
         '--config.warmup_steps=1', '--config.eval_every=4', '--config.checkpoint_every=4',
         '--config.log_every=2', '--config.eval_batch_size=120', '--config.progress=False']
  root = __file__.rsplit('/tests/', 1)[0]
  out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                       env=worker_env())
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stderr
  if family == 'eva':  # 4x4 -> 6x6 patches; 2 prefix rows (class token, register)
    assert 'reshaped pos_embed: (1, 18, 32) -> (1, 38, 32)' in log, log[-3000:]
    assert "rotary embedding: the 6x6 grid's coordinates scaled to the reference grid 4x4" in log
  else:  # (2*4-1)^2 + 3 -> (2*6-1)^2 + 3 offsets, every block
    tables = [line for line in log.splitlines()
              if 'reshaped' in line and 'relative_position_bias_table' in line]
    assert len(tables) == 2 and all('(52, 2) -> (124, 2)' in l for l in tables), log[-3000:]
    assert 'relative position tables (2) resized to the new patch grid (timm)' in log
  assert 'added    head/kernel' in log
  result = json.loads(out.stdout.strip().splitlines()[-1].split('result: ', 1)[1])
  assert result['step'] == 4 and np.isfinite(result['train_loss'])
