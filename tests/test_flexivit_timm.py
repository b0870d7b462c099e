"""FlexiViT and Google big_vision image towers against timm 1.0.

- PI-resize (`vit_jax.models.resize`) equals timm's `resample_patch_embed` on the same kernel:
  'linear' its bilinear without antialiasing (FlexiViT's, and what timm's FlexiViT and `.npz`
  loaders call), 'bicubic' its antialiased bicubic default.
- A timm FlexiViT directory at patch 8 fine-tuned into a patch-4 model here equals timm's own
  `checkpoint_filter_fn` for FlexiViT (bilinear, no antialiasing) into its patch-4 model: kernel,
  table and logits.
- big_vision `.npz` files (`params/img/` of a SigLIP two-tower checkpoint, `params/` of FlexiViT:
  kernel at 8x8 and a 3x3 table as FlexiViT's 32x32 and 7x7, in small) written here from a
  perturbed timm model by the inverse of timm's `_load_weights` mapping, read here and by timm's
  `_load_weights`, give the same logits.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests import interop
from tests.numerics import assert_close_to_scale, assert_logits_match

torch, timm = interop.require_timm()  # under scripts/test.sh a failure, not a skip

from vit_jax.checkpoints import load_pretrained, read_checkpoint  # noqa: E402
from vit_jax.convert import verify  # noqa: E402
from vit_jax.convert.api import resolve_architecture  # noqa: E402
from vit_jax.families import registry  # noqa: E402
from vit_jax.models import resize  # noqa: E402

TINY = dict(embed_dim=32, depth=2, num_heads=2, num_classes=3)
PE = 'Transformer/posembed_input/pos_embedding'


def perturbed(architecture: str, seed: int = 0, **kwargs):
  """timm's tiny model of this architecture, every parameter moved by N(0, 0.3), eval mode."""
  torch.manual_seed(seed)
  model = timm.create_model(architecture, pretrained=False, **TINY, **kwargs).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  return model


def timm_logits(model, images_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _ours(name: str, **overrides):
  """Our registered model `name` at TINY's sizes and its fields."""
  fields = {**registry.get_model_config(name), 'hidden_size': 32, 'num_layers': 2, 'num_heads': 2,
            'mlp_dim': 128, **overrides}
  model = registry.create_model(fields, 3)
  return model, fields


def _init(model, size: int):
  """Zeros in the shapes of the model's parameters (eval_shape compiles nothing)."""
  import jax  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, size, size, 3)))
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])


def _apply(model, params, images):
  import jax  # pylint: disable=import-outside-toplevel
  with jax.default_matmul_precision('highest'):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))


# ---------- PI-resize against timm.layers.resample_patch_embed ----------

@pytest.mark.parametrize('method,timm_args,old,new', [
    ('linear', ('bilinear', False), 32, 16),   # FlexiViT-S's checkpoint into its patch 16
    ('linear', ('bilinear', False), 8, 12),
    ('bicubic', ('bicubic', True), 8, 12),
    ('bicubic', ('bicubic', True), 12, 8)])
def test_pi_resize_equals_timms_resample_patch_embed(method, timm_args, old, new):
  from timm.layers import resample_patch_embed  # pylint: disable=import-outside-toplevel
  kernel = np.random.default_rng(old + new).normal(size=(old, old, 3, 8)).astype(np.float32)
  theirs = resample_patch_embed(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), [new, new],
                                interpolation=timm_args[0], antialias=timm_args[1])
  theirs = theirs.numpy().transpose(2, 3, 1, 0)
  ours = resize.pi_resize_kernel(kernel, new, method)
  err = float(np.max(np.abs(ours - theirs)))
  print(f'PI-resize {method} {old}->{new}: max |diff| {err:.3g} (kernel scale '
        f'{np.abs(theirs).max():.3g})')
  assert err <= 1e-5 * max(1.0, float(np.abs(theirs).max()))


# ---------- a timm FlexiViT directory moved to another patch size ----------

def test_timm_flexivit_directory_to_another_patch_size_equals_timms_filter(tmp_path):
  """timm's FlexiViT at patch 8 and 24 px (3x3) saved as timm saves it; fine-tuning it into our
  FlexiViT-S at patch 4 and 32 px (8x8, posemb_resize='linear') equals timm's FlexiViT filter into
  its patch-4 model: the kernel within 1e-5, the table, and the logits within 1e-4."""
  # pylint: disable=import-outside-toplevel
  from timm.models._hub import save_for_hf
  from timm.models.vision_transformer import checkpoint_filter_fn
  # pylint: enable=import-outside-toplevel
  source = perturbed('flexivit_small', seed=1, patch_size=8, img_size=24)
  save_for_hf(source, str(tmp_path / 'p8'), safe_serialization=True)
  target = timm.create_model('flexivit_small', pretrained=False, patch_size=4, img_size=32,
                             **TINY).eval()
  state = checkpoint_filter_fn({k: v.clone() for k, v in source.state_dict().items()}, target,
                               interpolation='bilinear', antialias=False)
  target.load_state_dict(state)

  model, fields = _ours('FlexiViT-S', patch_size=4, act='gelu')
  lines = []
  params, report = load_pretrained(tmp_path / 'p8', _init(model, 32), model=model,
                                   image_size=(32, 32), posemb_resize='linear', log=lines.append)
  assert any('embedding/kernel: patch 8x8 -> 4x4 (PI-resize, linear)' in l for l in lines), lines
  assert any('grid 3x3 -> 8x8 (linear)' in l for l in lines), lines
  kernel = state['patch_embed.proj.weight'].numpy().transpose(2, 3, 1, 0)
  err = float(np.max(np.abs(params['embedding']['kernel'] - kernel)))
  assert err <= 1e-5, err
  assert_close_to_scale(params['Transformer']['posembed_input']['pos_embedding'],
                        state['pos_embed'].numpy(), rtol=1e-6, what='pos_embed')
  images = np.random.default_rng(3).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  params['head'] = {'kernel': state['head.weight'].numpy().T, 'bias': state['head.bias'].numpy()}
  diff = assert_logits_match(_apply(model, params, images), timm_logits(target, images),
                             what='flexivit patch 8 -> 4')
  print(f'timm FlexiViT dir patch 8 -> 4: kernel |diff| {err:.3g}, logits |diff| {diff:.3g}')
  del fields


# ---------- big_vision .npz image towers ----------

def _t(x) -> np.ndarray:
  return x.detach().numpy().astype(np.float32)


def write_big_vision_npz(model, path, prefix: str) -> None:
  """A timm ViT's state in big_vision's `models/vit.py` names under `prefix` (the inverse of the
  big_vision branch of timm's `_load_weights`): `embedding` HWIO, top-level `pos_embedding`
  without class-token rows, blocks `encoderblock_{i}/{LayerNorm_0,
  MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}`, `MAPHead_0`, `head`."""
  sd = model.state_dict()
  d = model.embed_dim
  heads = model.blocks[0].attn.num_heads
  out = {'embedding/kernel': _t(sd['patch_embed.proj.weight']).transpose(2, 3, 1, 0),
         'embedding/bias': _t(sd['patch_embed.proj.bias']),
         'pos_embedding': _t(sd['pos_embed']),
         'Transformer/encoder_norm/scale': _t(sd['norm.weight']),
         'Transformer/encoder_norm/bias': _t(sd['norm.bias']),
         'head/kernel': _t(sd['head.weight']).T, 'head/bias': _t(sd['head.bias'])}
  if 'cls_token' in sd:
    out['cls'] = _t(sd['cls_token'])

  def attention(scope: str, names, weight, bias):
    for j, n in enumerate(names):
      w = _t(weight)[j * d:(j + 1) * d]  # [out = heads * k, in]
      out[f'{scope}/{n}/kernel'] = w.T.reshape(d, heads, d // heads)
      out[f'{scope}/{n}/bias'] = _t(bias)[j * d:(j + 1) * d].reshape(heads, d // heads)

  def dense(scope: str, t: str):
    out[f'{scope}/kernel'] = _t(sd[f'{t}.weight']).T
    out[f'{scope}/bias'] = _t(sd[f'{t}.bias'])

  def norm(scope: str, t: str):
    out[f'{scope}/scale'] = _t(sd[f'{t}.weight'])
    out[f'{scope}/bias'] = _t(sd[f'{t}.bias'])

  for i in range(len(model.blocks)):
    b, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
    att = f'{b}/MultiHeadDotProductAttention_0'
    norm(f'{b}/LayerNorm_0', f'{t}.norm1')
    attention(att, ('query', 'key', 'value'), sd[f'{t}.attn.qkv.weight'], sd[f'{t}.attn.qkv.bias'])
    out[f'{att}/out/kernel'] = _t(sd[f'{t}.attn.proj.weight']).T.reshape(heads, d // heads, d)
    out[f'{att}/out/bias'] = _t(sd[f'{t}.attn.proj.bias'])
    norm(f'{b}/LayerNorm_1', f'{t}.norm2')
    dense(f'{b}/MlpBlock_0/Dense_0', f'{t}.mlp.fc1')
    dense(f'{b}/MlpBlock_0/Dense_1', f'{t}.mlp.fc2')
  if 'attn_pool.latent' in sd:
    att = 'MAPHead_0/MultiHeadDotProductAttention_0'
    out['MAPHead_0/probe'] = _t(sd['attn_pool.latent'])
    attention(att, ('query',), sd['attn_pool.q.weight'], sd['attn_pool.q.bias'])
    attention(att, ('key', 'value'), sd['attn_pool.kv.weight'], sd['attn_pool.kv.bias'])
    out[f'{att}/out/kernel'] = _t(sd['attn_pool.proj.weight']).T.reshape(heads, d // heads, d)
    out[f'{att}/out/bias'] = _t(sd['attn_pool.proj.bias'])
    norm('MAPHead_0/LayerNorm_0', 'attn_pool.norm')
    dense('MAPHead_0/MlpBlock_0/Dense_0', 'attn_pool.mlp.fc1')
    dense('MAPHead_0/MlpBlock_0/Dense_1', 'attn_pool.mlp.fc2')
  extra = {'txt/head/kernel': np.ones((2, 2), np.float32)} if prefix == 'params/img/' else {}
  np.savez(path, **{prefix + k: v for k, v in out.items()},
           **{prefix.replace('img/', '') + k: v for k, v in extra.items()})


def timm_reads_npz(architecture: str, path, **kwargs):
  from timm.models.vision_transformer import _load_weights  # pylint: disable=g-import-not-at-top
  model = timm.create_model(architecture, pretrained=False, **TINY, **kwargs).eval()
  with torch.no_grad():
    _load_weights(model, str(path))
  return model


@pytest.mark.parametrize('prefix', ['params/img/', 'params/', ''])
def test_big_vision_siglip_image_tower_gives_timms_logits(prefix, tmp_path):
  """A SigLIP image tower (no class token, MAP head, big_vision's tanh GELU) in big_vision's names:
  read here as a ViT with classifier 'map' and no prefix rows; timm's loader agrees."""
  kw = dict(img_size=32, act_layer='gelu_tanh')
  write_big_vision_npz(perturbed('vit_base_patch16_siglip_224', seed=4, **kw), tmp_path / 's.npz',
                       prefix)
  theirs = timm_reads_npz('vit_base_patch16_siglip_224', tmp_path / 's.npz', **kw)
  ckpt = read_checkpoint(tmp_path / 's.npz')
  assert ckpt.format == 'npz/big_vision'
  assert not any(k.startswith('txt') for k in ckpt.params)  # the text tower is not the image's
  arch = resolve_architecture(ckpt)
  fields = arch.model_config
  assert (fields['classifier'], fields.get('act', 'gelu_tanh'), arch.image_size) == (
      'map', 'gelu_tanh', (32, 32))
  assert ckpt.params[PE].shape == (1, 4, 32)
  images = verify.sample_images(arch)
  diff = assert_logits_match(verify.our_logits(ckpt.params, arch, images),
                             timm_logits(theirs, images), what=f'siglip npz {prefix!r}')
  print(f'big_vision SigLIP npz ({prefix!r}): max |logit diff| {diff:.3g}')


def test_big_vision_flexivit_npz_into_flexivit_gives_timms_logits(tmp_path):
  """FlexiViT's file holds the kernel at its underlying patch (32, here 8) and a 7x7 (here 3x3)
  table without a class-token row. Read here it is a patch-8 ViT at 24 px whose class token has no
  position embedding; fine-tuned into FlexiViT-S at patch 4 and 32 px it is PI-resized and
  resampled (linear) as timm's `_load_weights` does into its flexivit_small: the same logits."""
  kw = dict(act_layer='gelu_tanh')
  write_big_vision_npz(perturbed('flexivit_small', seed=5, patch_size=8, img_size=24, **kw),
                       tmp_path / 'f.npz', 'params/')
  theirs = timm_reads_npz('flexivit_small', tmp_path / 'f.npz', patch_size=4, img_size=32, **kw)
  ckpt = read_checkpoint(tmp_path / 'f.npz')
  arch = resolve_architecture(ckpt)
  assert (arch.model_config['patch_size'], arch.image_size) == (8, (24, 24))
  assert np.all(ckpt.params[PE][:, 0] == 0)  # the class token's (absent) row
  model, _ = _ours('FlexiViT-S', patch_size=4)
  lines = []
  params, report = load_pretrained(tmp_path / 'f.npz', _init(model, 32), model=model,
                                   image_size=(32, 32), posemb_resize='linear', log=lines.append)
  assert any('embedding/kernel: patch 8x8 -> 4x4 (PI-resize, linear)' in l for l in lines), lines
  assert any('grid 3x3 -> 8x8 (linear)' in l for l in lines), lines
  assert 'head/kernel' not in report.added
  # The class token's zero row (big_vision gives it no position embedding) is left out, as timm's
  # flexivit_small (no_embed_class) has none.
  assert any('1 prefix rows in the checkpoint, 0 in the model: dropped (all zero' in n
             for n in report.notes), report.notes
  images = np.random.default_rng(6).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  diff = assert_logits_match(_apply(model, params, images), timm_logits(theirs, images),
                             what='flexivit npz')
  print(f'big_vision FlexiViT npz 8 -> 4: max |logit diff| {diff:.3g}')


def test_our_flexivit_exported_to_timm_is_timms_flexivit_small(tmp_path):
  """Our FlexiViT-S (tiny, perturbed, big_vision's tanh GELU) written `--to timm` declares timm's
  `flexivit_small`, and timm's model from that directory gives our logits."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import timm as timm_format  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  model, fields = _ours('FlexiViT-S', patch_size=4, head_zeroinit=False)
  fields['name'] = 'FlexiViT-S'
  rng = np.random.default_rng(9)
  params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), _init(model, 16))
  flat = params_lib.flatten_numpy(params)
  arch = Architecture(dict(fields), 3, (16, 16), 3, 'vit')
  timm_format.write_timm(tmp_path, flat, arch)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architecture'] == 'flexivit_small'
  theirs = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
  images = verify.sample_images(arch)
  diff = assert_logits_match(verify.our_logits(flat, arch, images), timm_logits(theirs, images),
                             what='FlexiViT-S --to timm')
  print(f'FlexiViT-S --to timm: max |logit diff| {diff:.3g}')
