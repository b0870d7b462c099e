"""`vit_jax.convert` without torch: layouts, round trips, architecture checks and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.numerics import assert_close_to_scale
from tests.test_npz import CLASSES, D, HEADS, LAYERS, MLP, make_params
from tests.test_vit_layers import sincos_reference
from vit_jax.checkpoints import read_checkpoint
from vit_jax.families.vit import FAMILY as VIT
from vit_jax.checkpoints.npz import write_npz
from vit_jax.convert import __main__ as cli
from vit_jax.convert import convert
from vit_jax.families import vit_hf_interop as vit_hf
from vit_jax.families import vit_interop
from vit_jax.formats import hf, timm

# The config.json fields `from_hf` reads for the test model (transformers' ViT defaults otherwise).
HF_CONFIG = {'num_attention_heads': HEADS, 'hidden_act': 'gelu_pytorch_tanh', 'layer_norm_eps': 1e-6,
             'image_size': 16}


def _npz(tmp_path, name='m.npz', **kwargs):
  path = tmp_path / name
  write_npz(path, make_params('vit_jax', **kwargs))
  return str(path)


def _bitwise_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), k


def _timm_by_hand(flat, layers):
  """timm's state dict of our parameters, written from timm's definitions: nn.Linear weight
  [out, in] (our kernels transposed); attention kernels [D, H, K] as [D, H*K] (heads-major, as
  timm's reshape(B, N, 3, H, K)) with attn.qkv stacking the q, k and v rows (attn_pool.kv: k, v);
  the out kernel [H, K, D] as [H*K, D]; LayerNorm scale -> weight; the patch kernel HWIO -> OIHW."""
  lin = lambda k: flat[k].reshape(-1, flat[k].shape[-1]).T      # [in..., out] -> [out, in]
  out_proj = lambda k: flat[k].reshape(-1, flat[k].shape[-1]).T  # [H, K, D] -> [D, H*K]
  heads_t = lambda k: flat[k].reshape(flat[k].shape[0], -1).T    # [D, H, K] -> [H*K, D]
  sd = {'patch_embed.proj.weight': flat['embedding/kernel'].transpose(3, 2, 0, 1),
        'patch_embed.proj.bias': flat['embedding/bias'],
        'pos_embed': flat['Transformer/posembed_input/pos_embedding'],
        'norm.weight': flat['Transformer/encoder_norm/scale'],
        'norm.bias': flat['Transformer/encoder_norm/bias'],
        'head.weight': flat['head/kernel'].T, 'head.bias': flat['head/bias']}
  if 'cls' in flat:
    sd['cls_token'] = flat['cls']

  def attention(ours, q_name, kv_names, out_name):
    qkv = [f'{ours}/{n}' for n in kv_names]
    sd[f'{q_name}.weight'] = np.concatenate([heads_t(f'{n}/kernel') for n in qkv])
    sd[f'{q_name}.bias'] = np.concatenate([flat[f'{n}/bias'].ravel() for n in qkv])
    sd[f'{out_name}.weight'] = out_proj(f'{ours}/out/kernel')
    sd[f'{out_name}.bias'] = flat[f'{ours}/out/bias']

  def block(ours, theirs, ln1, ln2, mlp):
    for n, t in ((ln1, 'norm1'), (ln2, 'norm2')):
      if n:
        sd[f'{theirs}.{t}.weight'], sd[f'{theirs}.{t}.bias'] = (flat[f'{ours}/{n}/scale'],
                                                               flat[f'{ours}/{n}/bias'])
    for n, t in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
      sd[f'{theirs}.mlp.{t}.weight'] = lin(f'{ours}/{mlp}/{n}/kernel')
      sd[f'{theirs}.mlp.{t}.bias'] = flat[f'{ours}/{mlp}/{n}/bias']

  for i in range(layers):
    b = f'Transformer/encoderblock_{i}'
    attention(f'{b}/MultiHeadDotProductAttention_1', f'blocks.{i}.attn.qkv',
              ('query', 'key', 'value'), f'blocks.{i}.attn.proj')
    block(b, f'blocks.{i}', 'LayerNorm_0', 'LayerNorm_2', 'MlpBlock_3')
  if 'MAPHead_0/probe' in flat:
    att = 'MAPHead_0/MultiHeadDotProductAttention_0'
    sd['attn_pool.latent'] = flat['MAPHead_0/probe']
    attention(att, 'attn_pool.q', ('query',), 'attn_pool.proj')
    attention(att, 'attn_pool.kv', ('key', 'value'), 'attn_pool.proj')
    sd['attn_pool.norm.weight'] = flat['MAPHead_0/LayerNorm_0/scale']
    sd['attn_pool.norm.bias'] = flat['MAPHead_0/LayerNorm_0/bias']
    block('MAPHead_0', 'attn_pool', None, None, 'MlpBlock_0')
  return sd


@pytest.mark.parametrize('classifier', ['token', 'map'])
def test_timm_layout_names_and_shapes(classifier):
  """Every tensor of the timm state dict, against timm's layout written out in the test: the
  query, key and value rows of qkv, the output projection, both MLP layers, norms, and the MAP
  head's latent, q, kv, proj, norm and MLP."""
  flat = make_params('vit_jax', classifier=classifier)
  sd = vit_interop.to_timm(flat, VIT.infer(flat))[0]
  assert sd['patch_embed.proj.weight'].shape == (D, 3, 4, 4)  # OIHW
  assert sd['blocks.0.attn.qkv.weight'].shape == (3 * D, D)
  assert sd['blocks.1.mlp.fc1.weight'].shape == (MLP, D)
  assert sd['head.weight'].shape == (CLASSES, D)
  if classifier == 'map':
    assert sd['attn_pool.kv.weight'].shape == (2 * D, D) and sd['attn_pool.latent'].shape == (1, 1, D)
    assert 'cls_token' not in sd
  want = _timm_by_hand(flat, LAYERS)
  assert sorted(sd) == sorted(want)
  for k in want:
    assert sd[k].dtype == np.float32 and sd[k].shape == want[k].shape, k
    np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map'])
def test_round_trip_timm_ours_timm_is_bitwise(tmp_path, classifier):
  flat = make_params('vit_jax', classifier=classifier, grid=(2, 3))
  arch = VIT.infer(flat, image_size=(8, 12))
  timm.write_timm(tmp_path / 'a', flat, arch)
  ckpt = read_checkpoint(tmp_path / 'a')
  assert ckpt.format == 'timm' and ckpt.architecture.image_size == (8, 12)
  _bitwise_equal(ckpt.params, flat)
  timm.write_timm(tmp_path / 'b', ckpt.params, ckpt.architecture)
  _bitwise_equal(load_file(tmp_path / 'a' / 'model.safetensors'),
                 load_file(tmp_path / 'b' / 'model.safetensors'))
  config = json.loads((tmp_path / 'a' / 'config.json').read_text())
  args = config['model_args']
  assert args['act_layer'] == 'gelu_tanh' and args['fc_norm'] is False
  assert args['global_pool'] == {'token': 'token', 'gap': 'avg', 'map': 'map'}[classifier]
  assert args['class_token'] == (classifier == 'token') and args['img_size'] == [8, 12]


def test_round_trip_hf_ours_hf_is_bitwise(tmp_path):
  flat = make_params('vit_jax')
  arch = VIT.infer(flat)
  hf.write_hf(tmp_path / 'a', flat, arch, class_names=list('abcde'))
  ckpt = read_checkpoint(tmp_path / 'a')
  assert ckpt.format == 'hf' and ckpt.class_names == list('abcde')
  _bitwise_equal(ckpt.params, flat)
  config = json.loads((tmp_path / 'a' / 'config.json').read_text())
  assert config['hidden_act'] == 'gelu_pytorch_tanh' and config['layer_norm_eps'] == 1e-6
  assert config['id2label'] == {str(i): c for i, c in enumerate('abcde')}
  assert config['image_size'] == 16 and config['patch_size'] == 4


def test_hf_reader_takes_transformers5_names_and_bare_vit_models(tmp_path):
  flat = make_params('vit_jax')
  sd = vit_hf.to_hf(flat, VIT.infer(flat))[0]
  v5 = {}
  for k, v in sd.items():
    for old, new in (('vit.encoder.layer.', 'vit.layers.'),
                     ('attention.attention.query', 'attention.q_proj'),
                     ('attention.attention.key', 'attention.k_proj'),
                     ('attention.attention.value', 'attention.v_proj'),
                     ('attention.output.dense', 'attention.o_proj'),
                     ('intermediate.dense', 'mlp.fc1'), ('.output.dense', '.mlp.fc2')):
      k = k.replace(old, new)
    v5[k] = v
  assert {'vit.layers.0.attention.v_proj.weight', 'vit.layers.1.mlp.fc2.weight'} <= set(v5)
  back = vit_hf.from_hf(v5, HF_CONFIG)[0]
  _bitwise_equal(back, flat)
  bare = {k[len('vit.'):]: v for k, v in sd.items() if k.startswith('vit.')}
  bare['pooler.dense.weight'] = np.zeros((D, D), np.float32)
  back, _, notes = vit_hf.from_hf(bare, HF_CONFIG)
  assert 'head/kernel' not in back and any('pooler' in n for n in notes)


def test_what_a_target_cannot_express_is_a_clear_error(tmp_path):
  # A MAP head under a classifier (the mean of the tokens is SigLIP's: tests/test_hf_variants.py).
  with pytest.raises(ValueError, match='no MAP.*--to timm'):
    convert(_npz(tmp_path, classifier='map'), 'hf', tmp_path / 'hf', log=None)
  rep = _npz(tmp_path, 'rep.npz', representation=8)
  with pytest.raises(ValueError, match='timm\'s VisionTransformer has no pre-logits layer'):
    convert(rep, 'timm', tmp_path / 'timm', log=None)
  with pytest.raises(ValueError, match='no pre-logits layer'):
    convert(rep, 'hf', tmp_path / 'hf', log=None)
  assert not (tmp_path / 'timm').exists()  # Nothing half-written.
  # A norm both before and after pooling (fc_norm alone is the ViT's field of that name).
  with pytest.raises(ValueError, match='both before and after pooling'):
    save_file({'patch_embed.proj.weight': np.zeros((D, 3, 4, 4), np.float32),
               **{f'{n}.{w}': np.zeros(D, np.float32)
                  for n in ('patch_embed.proj', 'norm', 'fc_norm') for w in ('weight', 'bias')
                  if (n, w) != ('patch_embed.proj', 'weight')}}, tmp_path / 'model.safetensors')
    (tmp_path / 'config.json').write_text(json.dumps({'model_args': {'num_heads': 2}}))
    read_checkpoint(tmp_path)


def test_cli_npz_to_npz_with_verify_and_model_check(tmp_path, capsys):
  src = _npz(tmp_path, representation=8)
  out = tmp_path / 'out.npz'
  assert cli.main(['--input', src, '--to', 'npz', '--output', str(out), '--model', 'ViT-testing',
                   '--verify']) == 0
  assert 'largest |logit difference| = 0' in capsys.readouterr().out
  with np.load(src) as a, np.load(out) as b:
    assert all(a[k].tobytes() == b[k].tobytes() for k in a.files)
  assert cli.main(['--input', src, '--to', 'npz', '--output', str(out), '--model', 'ViT-B_16']) == 2
  assert "hidden_size=32 (the config has 768)" in capsys.readouterr().err


def test_class_names_file_and_count_check(tmp_path):
  names = tmp_path / 'names.txt'
  names.write_text('cat\ndog\n\nbird\nfish\nemu\n')
  result = convert(_npz(tmp_path), 'hf', tmp_path / 'hf', class_names=str(names), log=None)
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config['id2label']['4'] == 'emu' and result.architecture.num_classes == 5
  with pytest.raises(ValueError, match='2 class names for a head of 5 classes'):
    convert(_npz(tmp_path), 'hf', tmp_path / 'hf2', class_names=['a', 'b'], log=None)


def test_timm_file_without_config_needs_the_head_count(tmp_path):
  flat = make_params('vit_jax')
  save_file(vit_interop.to_timm(flat, VIT.infer(flat))[0], tmp_path / 'w.safetensors')
  with pytest.raises(ValueError, match='head count is not in the weights'):
    read_checkpoint(tmp_path / 'w.safetensors')
  result = convert(tmp_path / 'w.safetensors', 'npz', tmp_path / 'o.npz', model='ViT-testing',
                   log=None)
  assert result.input_format == 'timm' and result.architecture.model_config['num_heads'] == HEADS


@pytest.mark.parametrize('via', ['timm', 'npz', 'hf'])
def test_round_trip_orbax_to_torch_layouts_and_back_is_bitwise(tmp_path, via):
  from vit_jax.checkpoints import manager
  from vit_jax.models import params as params_lib
  flat = make_params('vit_jax', grid=(2, 3))
  arch = VIT.infer(flat, image_size=(8, 12))
  names = [f'class{i}' for i in range(CLASSES)]
  manager.save_params(tmp_path / 'orig', params_lib.unflatten(flat),
                      {'architecture': arch.to_meta(), 'class_names': names})
  out = convert(str(tmp_path / 'orig'), via, tmp_path / via, log=None)
  assert out.input_format == 'orbax'
  # An npz carries no image size, and a 2x3 grid is not square: say it, as a user would.
  back = convert(str(tmp_path / via) + ('/model.npz' if via == 'npz' else ''), 'orbax',
                 tmp_path / 'back', image_size=(8, 12) if via == 'npz' else None, log=None)
  assert back.input_format.startswith(via)
  tree, meta = manager.load_params(tmp_path / 'back')
  _bitwise_equal({k: np.asarray(v) for k, v in params_lib.flatten(tree).items()}, flat)
  if via != 'npz':  # the npz layout carries no class names
    assert read_checkpoint(tmp_path / 'back').class_names == names
  with pytest.raises(Exception, match='already holds checkpoints'):
    convert(str(tmp_path / 'orig'), 'orbax', tmp_path / 'back', log=None)


def test_fixed_position_embeddings_are_written_as_values(tmp_path):
  flat = make_params('vit_jax')
  del flat['Transformer/posembed_input/pos_embedding']
  arch = VIT.infer(flat, image_size=(16, 16), model_config={'posemb': 'sincos2d'})
  sd = vit_hf.to_hf(flat, arch)[0]
  pe = sd['vit.embeddings.position_embeddings']
  assert pe.shape == (1, 17, D)
  np.testing.assert_array_equal(pe[:, 0], 0)
  # Against the formula written out in the test (values <= 1 in float32: within half an ulp).
  assert_close_to_scale(pe[0, 1:], sincos_reference(4, 4, D), rtol=1e-7, what='sincos2d')


def test_timm_no_embed_class_is_read_as_no_embed_class(tmp_path):
  """timm's no_embed_class (no position row for the class token) is the ViT's field of that name:
  the table is read as it is (DeiT III's parameter count), and written back the same."""
  flat = make_params('vit_jax')
  sd = vit_interop.to_timm(flat, VIT.infer(flat))[0]
  sd['pos_embed'] = sd['pos_embed'][:, 1:].copy()  # timm's no_embed_class: no class-token row.
  save_file(sd, tmp_path / 'model.safetensors')
  (tmp_path / 'config.json').write_text(json.dumps(
      {'architecture': 'vit_base_patch16_224',
       'model_args': {'num_heads': HEADS, 'img_size': 16, 'no_embed_class': True}}))
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.architecture.model_config['no_embed_class'] is True
  pe = ckpt.params['Transformer/posembed_input/pos_embedding']
  np.testing.assert_array_equal(pe, flat['Transformer/posembed_input/pos_embedding'][:, 1:])
  back = vit_interop.to_timm(ckpt.params, ckpt.architecture)
  np.testing.assert_array_equal(back[0]['pos_embed'], sd['pos_embed'])
  assert back[1]['model_args']['no_embed_class'] is True
