"""The ViT's later variants against Hugging Face transformers (CPU torch): DINOv2 with and without
registers (`Dinov2[WithRegisters]Model` / `...ForImageClassification`) and SigLIP's image tower
(`SiglipVisionModel` with its attention-pooling head, `SiglipForImageClassification` on the mean).

A tiny model of each feature combination (tests/test_vit_variants.py's, every parameter moved by
N(0, 0.3) noise, LayerScale and registers too), written with `convert --to hf`'s writer, loads in
transformers without a missing or unexpected key and gives our logits, pooled features and last
hidden state within 1e-4; the directory reads back here (`read_checkpoint`, `predict`) with the same
logits and its normalisation. transformers' own (perturbed) models read here give theirs. What
transformers cannot express is refused with the reason.
"""
from __future__ import annotations

import json

import jax
import numpy as np
from PIL import Image
import pytest

from tests import interop
from tests.numerics import assert_close_to_scale, assert_logits_match

torch = interop.require('torch')  # under scripts/test.sh a failure, not a skip
transformers = interop.require('transformers')

from tests.test_vit_variants import BASE, VARIANTS, build  # noqa: E402
from vit_jax import predict  # noqa: E402
from vit_jax.checkpoints import read_checkpoint  # noqa: E402
from vit_jax.convert import convert, verify  # noqa: E402
from vit_jax.families import registry  # noqa: E402
from vit_jax.families.base import IMAGENET, SIGNED_UNIT, Architecture  # noqa: E402
from vit_jax.formats import hf  # noqa: E402
from vit_jax.models import params as params_lib  # noqa: E402

# case -> (the ViT's fields, classes (0: headless), normalisation, transformers class written).
CASES = {
    'dinov2': (VARIANTS['dinov2'], 5, IMAGENET, 'Dinov2ForImageClassification'),
    'dinov2-encoder': (VARIANTS['dinov2'], 0, IMAGENET, 'Dinov2Model'),
    'dinov2-reg': (VARIANTS['dinov2-reg'], 5, IMAGENET,
                   'Dinov2WithRegistersForImageClassification'),
    # Registers with rows of the table, no LayerScale: rows folded into the registers, lambdas 1.
    'reg-rows-tanh': (dict(num_registers=2), 0, SIGNED_UNIT, 'Dinov2WithRegistersModel'),
    'deit3': (VARIANTS['deit3'], 5, IMAGENET, 'Dinov2ForImageClassification'),
    # A patch-only table alone (FlexiViT): ViT's table with a zero row for the class token.
    'no-class-row': (dict(no_embed_class=True), 5, SIGNED_UNIT, 'ViTForImageClassification'),
    'siglip-map': (VARIANTS['siglip'], 0, SIGNED_UNIT, 'SiglipVisionModel'),
    'siglip-gap': (VARIANTS['siglip-gap'], 5, SIGNED_UNIT, 'SiglipForImageClassification'),
    # No head: the vision model without its pooling head (the mean of its tokens: our pre-logits).
    'siglip-gap-encoder': (VARIANTS['siglip-gap'], 0, SIGNED_UNIT, 'SiglipVisionModel'),
}
SIZE = 16  # ViT-testing: patch 4, a 4x4 grid


def _ours(flat, arch, images):
  """(logits or pre-logits, pre-logits, every token after the final norm [B, P + N, D])."""
  model = arch.create_model()
  params = params_lib.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  with jax.default_matmul_precision('highest'):
    out, aux = jax.jit(lambda p, x: model.apply({'params': p}, x, return_aux=True))(params, images)
  tokens = np.concatenate([aux['prefix_tokens'], aux['patch_tokens']], axis=1)
  return np.asarray(out), np.asarray(aux['pre_logits']), tokens


def _theirs(model, images):
  """(logits or pooler_output, the encoder's last hidden state) of a transformers model."""
  inner = next((getattr(model, n) for n in ('vit', 'dinov2', 'dinov2_with_registers',
                                            'vision_model')
                if hasattr(model, n)), model)
  x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  with torch.no_grad():
    out, enc = model(pixel_values=x), inner(pixel_values=x)
  if getattr(out, 'logits', None) is not None:
    main = out.logits
  else:  # a SigLIP encoder without its pooling head: the mean
    main = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
  return main.numpy(), enc.last_hidden_state.numpy()


def _variant(case, seed=0):
  fields, classes, (mean, std), _ = CASES[case]
  _, _, params = build(classes=classes, seed=seed, **fields)
  flat = params_lib.flatten_numpy(params)
  arch = Architecture({**BASE, **fields}, classes or None, (SIZE, SIZE), 3, 'vit', mean, std)
  return flat, arch


@pytest.mark.parametrize('case', sorted(CASES))
def test_export_loads_in_transformers_and_reads_back(case, tmp_path):
  flat, arch = _variant(case)
  hf.write_hf(tmp_path, flat, arch, class_names=list('abcde') if arch.num_classes else None)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['architectures'] == [CASES[case][3]]
  model = verify.load_hf_model(str(tmp_path))  # raises on a missing or unexpected key
  assert type(model).__name__ == CASES[case][3]
  images = verify.sample_images(arch)
  ours, pre_logits, tokens = _ours(flat, arch, images)
  theirs, hidden = _theirs(model, images)
  diff = assert_logits_match(ours, theirs, what=case)
  assert_close_to_scale(hidden, tokens, rtol=1e-5, what=f'{case} last hidden state')
  if not arch.num_classes:
    np.testing.assert_array_equal(ours, pre_logits)

  # The normalisation travels in preprocessor_config.json, and comes back.
  pre = json.loads((tmp_path / 'preprocessor_config.json').read_text())
  assert (tuple(pre['image_mean']), tuple(pre['image_std'])) == (arch.mean, arch.std)
  ckpt = read_checkpoint(tmp_path)
  back = ckpt.architecture
  assert ckpt.format == 'hf' and (back.mean, back.std) == (arch.mean, arch.std)
  assert back.num_classes == arch.num_classes and back.image_size == arch.image_size
  defaults = dict(num_registers=0, act='gelu_tanh', no_embed_class=False)  # the module's
  for key in ('classifier', 'num_registers', 'act', 'no_embed_class'):
    assert back.model_config.get(key, defaults.get(key)) == arch.model_config.get(
        key, defaults.get(key)), key
  again = verify.our_logits(ckpt.params, back, images)
  back_diff = assert_logits_match(again, theirs, what=f'{case} read back')
  print(f'{case}: max |diff| ours vs transformers {diff:.3g}, read back {back_diff:.3g}')


def test_predict_reads_an_exported_dinov2_with_its_normalisation(tmp_path):
  """An image file through `predict` of the exported directory: ImageNet's mean/std applied, the
  logits transformers gives for the same normalised pixels."""
  flat, arch = _variant('dinov2-reg', seed=3)
  convert_dir = tmp_path / 'hf'
  hf.write_hf(convert_dir, flat, arch)
  image = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
  Image.fromarray(image).save(tmp_path / 'x.png')
  assert predict.main(['--checkpoint', str(convert_dir), str(tmp_path / 'x.png'),
                       '--logits_out', str(tmp_path / 'logits.npy')]) == 0
  pixels = (image.astype(np.float32) / 255.0 - np.float32(IMAGENET[0])) / np.float32(IMAGENET[1])
  theirs, _ = _theirs(verify.load_hf_model(str(convert_dir)), pixels[None])
  assert_logits_match(np.load(tmp_path / 'logits.npy'), theirs, what='predict')


@pytest.mark.parametrize('case', ['dinov2-reg', 'siglip-map', 'siglip-gap-encoder'])
def test_convert_cli_verifies_the_export(case, tmp_path, capsys):
  """`python -m vit_jax.convert --to hf --verify` from a timm-layout directory of ours: logits, or a
  headless encoder's pooled output (SigLIP without its pooling head: the mean of its tokens)."""
  from vit_jax.convert import __main__ as cli  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import timm as timm_format  # pylint: disable=import-outside-toplevel
  flat, arch = _variant(case, seed=4)
  timm_format.write_timm(str(tmp_path / 'timm'), flat, arch, None)
  assert cli.main(['--input', str(tmp_path / 'timm'), '--to', 'hf', '--output',
                   str(tmp_path / 'hf'), '--verify']) == 0
  out = capsys.readouterr().out
  assert float(out.rsplit('= ', 1)[1]) <= 1e-4
  pre = json.loads((tmp_path / 'hf' / 'preprocessor_config.json').read_text())
  assert (tuple(pre['image_mean']), tuple(pre['image_std'])) == CASES[case][2]


def _perturb(model, seed=0):
  torch.manual_seed(seed)
  with torch.no_grad():  # HF starts LayerNorms at 1/0, registers and biases at 0: move everything
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.3)
  return model.eval()


def _hf_dinov2(registers: int, headed: bool):
  kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            image_size=SIZE, patch_size=4, num_labels=3)
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)
    cls = (transformers.Dinov2WithRegistersForImageClassification if headed
           else transformers.Dinov2WithRegistersModel)
  else:
    config = transformers.Dinov2Config(**kw)
    cls = transformers.Dinov2ForImageClassification if headed else transformers.Dinov2Model
  return _perturb(cls(config))


def _hf_siglip(headed: bool):
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=SIZE, patch_size=4)
  if headed:
    config = transformers.SiglipConfig(vision_config={**vision, 'vision_use_head': False},
                                       num_labels=3)
    return _perturb(transformers.SiglipForImageClassification(config))
  return _perturb(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision)))


@pytest.mark.parametrize('what', ['dinov2', 'dinov2-reg', 'siglip-map', 'siglip-gap'])
def test_transformers_models_read_here_with_their_outputs(what, tmp_path):
  """transformers' own models saved by `save_pretrained` (its spelling of the names): the bare
  encoders' pooled output is our pre-logits; SigLIP's classifier gives its logits. A DINOv2
  classifier with weights on the mean of the patches is refused (our ViT classifies the class
  token alone), and reads once that half is zero."""
  if what.startswith('dinov2'):
    model = _hf_dinov2(4 if what.endswith('reg') else 0, headed=False)
  else:
    model = _hf_siglip(headed=what == 'siglip-gap')
  model.save_pretrained(tmp_path)
  ckpt = read_checkpoint(tmp_path)
  fields = ckpt.architecture.model_config
  images = np.random.RandomState(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  theirs, hidden = _theirs(model, images)
  ours, _, tokens = _ours(ckpt.params, ckpt.architecture, images)
  assert_logits_match(ours, theirs, what=what)
  assert_close_to_scale(tokens, hidden, rtol=1e-5, what=f'{what} last hidden state')
  expect = {'dinov2': ('token', 0, IMAGENET), 'dinov2-reg': ('token', 4, IMAGENET),
            'siglip-map': ('map', 0, SIGNED_UNIT), 'siglip-gap': ('gap', 0, SIGNED_UNIT)}[what]
  assert (fields['classifier'], fields.get('num_registers', 0),
          (ckpt.architecture.mean, ckpt.architecture.std)) == expect
  if what == 'dinov2-reg':
    assert fields['no_embed_class'] and fields['layer_scale'] == 1e-5  # timm's layout of it
    # Any input size, the table resampled as transformers does (bicubic, antialiased).
    assert fields['dynamic_img_size'] and fields['dynamic_resize'] == 'bicubic'
    for h, w in ((28, 20), (8, 12)):
      x = np.random.RandomState(h).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)
      theirs, hidden = _theirs(model, x)
      ours, _, tokens = _ours(ckpt.params, ckpt.architecture, x)
      assert_logits_match(ours, theirs, what=f'{what} at {h}x{w}')
      assert_close_to_scale(tokens, hidden, rtol=1e-5, what=f'{what} at {h}x{w}')


def test_a_whole_siglip_model_reads_as_its_image_tower(tmp_path):
  """`SiglipModel` (image and text towers): the image tower's pooled output is our pre-logits; the
  text tower and the logit scale and bias are left out, with a note."""
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=SIZE, patch_size=4)
  text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              vocab_size=50, bos_token_id=None, eos_token_id=None, pad_token_id=None)
  model = _perturb(transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision,
                                                                      text_config=text)))
  model.save_pretrained(tmp_path)
  ckpt = read_checkpoint(tmp_path)
  assert any('text tower' in n for n in ckpt.notes)
  assert ckpt.architecture.model_config['classifier'] == 'map' and not ckpt.architecture.num_classes
  images = np.random.RandomState(2).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  theirs, _ = _theirs(model.vision_model, images)
  assert_logits_match(verify.our_logits(ckpt.params, ckpt.architecture, images), theirs)


def test_dinov2_reader_takes_transformers5_in_memory_names():
  """`encoder.layer.{i}.attention.{q,k,v,o}_proj` (transformers 5's module names) read as the
  Hub's `attention.attention.{query,key,value}` and `attention.output.dense`, bitwise."""
  from vit_jax.families import vit_dinov2_hf_interop as dino  # pylint: disable=g-import-not-at-top
  flat, arch = _variant('dinov2-reg', seed=5)
  state, config = dino.to_hf(flat, arch)
  renamed = {k.replace('attention.attention.query', 'attention.q_proj')
              .replace('attention.attention.key', 'attention.k_proj')
              .replace('attention.attention.value', 'attention.v_proj')
              .replace('attention.output.dense', 'attention.o_proj'): v for k, v in state.items()}
  assert any('.attention.o_proj.' in k for k in renamed)
  a = dino.from_hf(state, {**config, 'vit_jax': arch.to_meta()})[0]
  b = dino.from_hf(renamed, {**config, 'vit_jax': arch.to_meta()})[0]
  assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  assert all(a[k].tobytes() == np.asarray(flat[k], np.float32).tobytes() for k in flat)


def test_dinov2_classifier_on_the_mean_is_refused_and_zero_mean_half_reads(tmp_path):
  model = _hf_dinov2(2, headed=True)
  model.save_pretrained(tmp_path / 'mean')
  with pytest.raises(ValueError, match='concat\\(class token, mean of the patch tokens\\)'):
    read_checkpoint(tmp_path / 'mean')
  with torch.no_grad():
    model.classifier.weight[:, 32:] = 0
  model.save_pretrained(tmp_path / 'cls')
  ckpt = read_checkpoint(tmp_path / 'cls')
  images = np.random.RandomState(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  theirs, _ = _theirs(model, images)
  assert_logits_match(verify.our_logits(ckpt.params, ckpt.architecture, images), theirs)


def test_what_transformers_cannot_express_is_refused_with_the_reason(tmp_path):
  """SigLIP's MAP head under a classifier, registers or LayerScale without a class token
  (ViT-Little), non-square inputs, and a norm after pooling: refused, naming `--to timm`, with
  nothing written."""
  interop_ = registry.interop('vit')
  _, _, params = build(classes=5, **VARIANTS['siglip'])
  headed = params_lib.flatten_numpy(params)
  with pytest.raises(ValueError, match='no MAP .*--to timm'):
    interop_.to_hf(headed, Architecture({**BASE, **VARIANTS['siglip']}, 5, (SIZE, SIZE)))
  _, _, params = build(classes=5, **VARIANTS['little'])
  little = Architecture({**BASE, **VARIANTS['little']}, 5, (SIZE, SIZE))
  with pytest.raises(ValueError, match='fc_norm=True.*nor with.*without a class token.*--to timm'):
    interop_.to_hf(params_lib.flatten_numpy(params), little)
  no_fc = {**VARIANTS['little'], 'fc_norm': False}
  _, _, params = build(classes=5, **no_fc)
  with pytest.raises(ValueError, match='no ViT with layer_scale=0.5 and num_registers=2 without a '
                     'class token.*--to timm'):
    interop_.to_hf(params_lib.flatten_numpy(params), Architecture({**BASE, **no_fc}, 5, (16, 16)))
  _, _, params = build(classes=5, size=16, dynamic_img_size=True, **VARIANTS['dinov2'])
  wide = Architecture({**BASE, **VARIANTS['dinov2'], 'posemb_grid': 4}, 5, (16, 24))
  with pytest.raises(ValueError, match='square.*--to timm'):
    interop_.to_hf(params_lib.flatten_numpy(params), wide)
  with pytest.raises(ValueError, match='no EVA-02 or RoPE'):
    registry.interop('eva').to_hf({}, Architecture(
        dict(registry.get_model_config(registry.get_family('eva').test_model)), 5, (16, 16),
        family='eva'))
  assert not list(tmp_path.iterdir())


# timm architecture -> (tiny image size, classes, the transformers class `--to hf` writes).
TIMM_CASES = {
    'vit_small_patch14_dinov2': (28, 3, 'Dinov2ForImageClassification'),
    'vit_small_patch14_reg4_dinov2': (28, 3, 'Dinov2WithRegistersForImageClassification'),
    'deit3_small_patch16_224': (32, 3, 'Dinov2ForImageClassification'),
    'flexivit_small': (32, 3, 'ViTForImageClassification'),
    'vit_base_patch16_siglip_224': (32, 0, 'SiglipVisionModel'),
    'vit_base_patch16_siglip_gap_224': (32, 3, 'SiglipForImageClassification'),
}


@pytest.mark.parametrize('architecture', sorted(TIMM_CASES))
def test_timm_checkpoint_to_transformers_gives_timms_outputs(architecture, tmp_path):
  """timm's own (perturbed, tiny) model, saved as timm saves it, through `convert --to hf`:
  transformers' model gives timm's logits (a headless SigLIP: its attention-pooled features), and
  the preprocessor carries timm's normalisation."""
  _, timm = interop.require_timm()
  from timm.models._hub import save_for_hf  # pylint: disable=g-import-not-at-top
  size, classes, name = TIMM_CASES[architecture]
  torch.manual_seed(0)
  model = timm.create_model(architecture, pretrained=False, img_size=size, embed_dim=32, depth=2,
                            num_heads=2, num_classes=classes).eval()
  with torch.no_grad():
    for key, p in model.named_parameters():
      p.add_(torch.randn_like(p) * 0.3 + (0.5 if key.endswith('.gamma') else 0.0))
  save_for_hf(model, str(tmp_path / 'timm'), safe_serialization=True)
  result = convert(tmp_path / 'timm', 'hf', tmp_path / 'hf', verify=True, log=None)
  assert result.max_abs_diff <= 1e-4
  theirs = verify.load_hf_model(str(tmp_path / 'hf'))
  assert type(theirs).__name__ == name
  images = np.random.RandomState(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want = model(x).numpy()
  got, _ = _theirs(theirs, images)
  diff = assert_logits_match(got, want, what=architecture)
  pre = json.loads((tmp_path / 'hf' / 'preprocessor_config.json').read_text())
  cfg = model.pretrained_cfg
  assert np.allclose(pre['image_mean'], cfg['mean']) and np.allclose(pre['image_std'], cfg['std'])
  print(f'{architecture}: timm vs transformers max |diff| {diff:.3g}')


def test_a_transformers_dinov2_with_registers_starts_a_model_at_another_size(tmp_path):
  """`config.pretrained=PATH` of transformers' Dinov2WithRegistersModel (16x16, a 4x4 table) into a
  7-class model at 24x24: the class token carries its position row, the registers come over, the
  patch-only table is resampled to 6x6 (and named in the report), the new head starts at zero."""
  from vit_jax.checkpoints.pretrained import load_pretrained  # pylint: disable=g-import-not-at-top
  from vit_jax.families import resample  # pylint: disable=g-import-not-at-top
  from vit_jax.families.vit import POSEMB_KEY  # pylint: disable=g-import-not-at-top
  model = _hf_dinov2(4, headed=False)
  model.save_pretrained(tmp_path)
  fields = {**BASE, 'act': 'gelu', 'layer_scale': 1e-5, 'num_registers': 4,
            'no_embed_class': True}
  target = registry.get_family('vit').create(fields, 7)
  init = target.init(jax.random.PRNGKey(0), np.zeros((1, 24, 24, 3), np.float32))['params']
  params, report = load_pretrained(tmp_path, init, model=target, log=None)
  got = params_lib.flatten_numpy(params)
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  pe = sd['embeddings.position_embeddings']
  np.testing.assert_array_equal(got['cls'], sd['embeddings.cls_token'] + pe[:, :1])
  np.testing.assert_array_equal(got['registers'], sd['embeddings.register_tokens'])
  want = resample.resample_posemb(pe[:, 1:], (6, 6), num_prefix=0, old_grid=(4, 4),
                                  method='bilinear')
  assert_close_to_scale(got[POSEMB_KEY], want, rtol=1e-6, what='resampled table')
  assert any('grid 4x4 -> 6x6' in line for line in report.lines()), report
  assert not got['head/kernel'].any()
