"""Visual prompt tuning (vit_jax/objectives/prompt.py): the shallow and deep equations against a
hand-written forward pass, the trained-parameter formula, no optimizer state for the frozen backbone
(and the compiled step's memory saving), and end to end: a frozen backbone bitwise unchanged, a
checkpoint of prompts and head with a checked reference to the backbone, `predict` and
`checkpoints info` reassembling it, and `convert --to timm` refusing it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sharding_worker import worker_env
from tests.test_mpp import ROOT, TINY, _main
from vit_jax.families import registry
from vit_jax.models import params as params_lib
from vit_jax.models import vit as vit_models
from vit_jax.models.tokens import TokenInputs
from vit_jax.objectives import prompt
from vit_jax.train import build as build_lib


def _reference(params, images, prompts, deep):
  """ViT-testing (2 blocks, a class token, learned position embeddings) with prompts, written out
  from its submodules: [x_0, P, E_0] into block 0; deep: block 1's prompt slots take P_1."""
  embed = nn.Conv(32, (4, 4), strides=(4, 4), padding='VALID')
  x = embed.apply({'params': params['embedding']}, images)
  x = x.reshape(x.shape[0], -1, 32)
  cls = jnp.broadcast_to(params['cls'], (x.shape[0], 1, 32))
  x = jnp.concatenate([cls, x], 1) + params['Transformer']['posembed_input']['pos_embedding']
  p0 = prompts[0] if deep else prompts
  x = jnp.concatenate([x[:, :1], jnp.broadcast_to(p0, (x.shape[0], *p0.shape)), x[:, 1:]], 1)
  n = p0.shape[0]
  for i in range(2):
    if deep and i:
      x = x.at[:, 1:1 + n].set(prompts[i])
    block = vit_models.Encoder1DBlock(mlp_dim=64, num_heads=2, attention_impl=None)
    x, _ = block.apply({'params': params['Transformer'][f'encoderblock_{i}']}, x, 0.0)
  x = jnp.concatenate([x[:, :1], x[:, 1 + n:]], 1)
  x = nn.LayerNorm(epsilon=1e-6).apply({'params': params['Transformer']['encoder_norm']}, x)
  return nn.Dense(5).apply({'params': params['head']}, x[:, 0]), x.shape[1]


@pytest.mark.parametrize('deep', [False, True])
def test_prompts_follow_the_shallow_and_deep_equations(deep):
  model = registry.create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False,
                                attention_impl=None)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(1), x)['params']
  shape = (2, 3, 32) if deep else (3, 32)
  prompts = jax.random.normal(jax.random.PRNGKey(2), shape)
  got, aux = model.apply({'params': params}, x, tokens=TokenInputs(prompts=prompts),
                         return_aux=True, return_weights=False)
  want, tokens = _reference(params, x, prompts, deep)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert tokens == 17 and aux['patch_tokens'].shape == (2, 16, 32)  # prompt outputs dropped
  plain = model.apply({'params': params}, x)
  assert float(jnp.abs(got - plain).max()) > 1e-3  # prompts change the logits
  if deep:  # the last block's prompts matter too (they would not, were they only inserted once)
    other = prompts.at[1].add(jax.random.normal(jax.random.PRNGKey(3), prompts.shape[1:]))
    moved = model.apply({'params': params}, x, tokens=TokenInputs(prompts=other))
    assert float(jnp.abs(moved - got).max()) > 1e-3


def _config(num_tokens, deep, name='prompt'):
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = quickstart.get_config('model=ViT-testing')
  c.model.patch_size = 4
  c.model.classifier, c.model.posemb = 'token', 'learned'
  c.image_size, c.channels, c.batch_size = 16, 3, 8
  c.objective.name = name
  c.prompt.num_tokens, c.prompt.deep = num_tokens, deep
  c.pretrained = '/a/backbone' if name == 'prompt' else None
  return c


@pytest.mark.parametrize('num_tokens,deep', [(5, False), (5, True), (0, False)])
def test_trained_parameters_follow_the_formula(num_tokens, deep):
  built = build_lib.build_training(_config(num_tokens, deep), 10, abstract=True)
  trained = params_lib.count(built.abstract_state.params)
  head = 32 * 10 + 10
  assert trained == prompt.trained_count(num_tokens, deep, 2, 32, head)
  assert trained == num_tokens * 32 * (2 if deep else 1) + head
  # Adam keeps two moments of the trained parameters, none of the frozen ones.
  opt = sum(x.size for x in jax.tree.leaves(built.abstract_state.opt_state) if x.ndim)
  assert opt == 2 * trained
  assert params_lib.count(built.extras['frozen']) + head == params_lib.count(
      build_lib.build_training(_config(0, False, 'classify'), 10, abstract=True)
      .abstract_state.params)


def test_the_compiled_step_holds_no_optimizer_state_for_the_backbone():
  """memory_analysis of the compiled train steps: full fine-tuning against prompt tuning of the
  same model; the arguments differ by the backbone's two Adam moments (the frozen parameters are
  arguments either way)."""
  def args_bytes(c):
    built = build_lib.build_training(c, 10, abstract=True)
    return built.lower().compile().memory_analysis().argument_size_in_bytes, built
  full, full_built = args_bytes(_config(0, False, 'classify'))
  vpt, vpt_built = args_bytes(_config(5, True))
  backbone = 4 * params_lib.count(vpt_built.extras['frozen'])
  saved = full - vpt
  print(f'compiled train step arguments: full fine-tuning {full} B, deep VPT {vpt} B '
        f'(saved {saved} B; the backbone is {backbone} B)')
  assert 1.9 * backbone < saved < 2.1 * backbone


def _run(tmp_path, name, *args):
  return _main(tmp_path / name, *TINY, *args)


def test_prompt_tuning_end_to_end(tmp_path):
  _run(tmp_path, 'backbone')  # a supervised backbone (6 steps on digits)
  source = tmp_path / 'copy'
  shutil.copytree(tmp_path / 'backbone', source)
  vpt = ['--config.objective.name=prompt', '--config.prompt.num_tokens=2',
         '--config.prompt.deep=True', '--config.prompt.dropout=0.1', f'--config.pretrained={source}',
         '--config.optimizer=sgd', '--config.weight_decay=0.0', '--config.base_lr=0.1']
  result, _ = _run(tmp_path, 'vpt', *vpt)
  assert result['step'] == 6 and 'eval_top1' in result
  from vit_jax.checkpoints import read_checkpoint  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints.manager import load_params  # pylint: disable=import-outside-toplevel
  saved, meta = load_params(str(tmp_path / 'vpt'))
  assert sorted(params_lib.flatten(saved)) == ['head/bias', 'head/kernel', 'objective/prompts']
  assert saved['objective']['prompts'].shape == (2, 2, 32)
  assert meta['objective']['frozen_from']['path'] == str(source)
  # Every backbone parameter is bitwise the source's; the head trained.
  src, run = read_checkpoint(str(source)), read_checkpoint(str(tmp_path / 'vpt'))
  assert sorted(src.params) == sorted(run.params)
  for key, value in src.params.items():
    same = np.array_equal(value, run.params[key])
    assert same != key.startswith('head/'), key
  # predict: the reassembled model with its prompts.
  from vit_jax.predict import load_predictor  # pylint: disable=import-outside-toplevel
  predictor = load_predictor(str(tmp_path / 'vpt'))
  x = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  model = predictor.arch.create_model()
  want = model.apply({'params': params_lib.unflatten(run.params)}, x,
                     tokens=TokenInputs(prompts=jnp.asarray(saved['objective']['prompts'])))
  np.testing.assert_allclose(predictor.logits(x), np.asarray(want), atol=1e-5)
  # checkpoints info shows the reference; convert refuses with the reason.
  env = worker_env()
  out = subprocess.run([sys.executable, '-m', 'vit_jax.checkpoints', 'info', str(tmp_path / 'vpt')],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr
  assert f'frozen backbone: {source}' in out.stdout and 'sha256 matches' in out.stdout
  out = subprocess.run([sys.executable, '-m', 'vit_jax.convert', '--input', str(tmp_path / 'vpt'),
                        '--to', 'timm', '--output', str(tmp_path / 'timm')], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode != 0 and 'no prompt tokens' in out.stderr
  # The backbone file changes under the run: resuming and predicting both refuse, naming it.
  shutil.rmtree(source)
  _main(source, *TINY, '--config.seed=1')
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--workdir={tmp_path / "vpt"}', *TINY, *vpt,
         '--config.total_steps=8']
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode != 0 and 'sha256' in out.stderr and str(source) in out.stderr
  with pytest.raises(ValueError, match='restore the file the run was trained on'):
    load_predictor(str(tmp_path / 'vpt'))
  assert os.path.isdir(tmp_path / 'vpt' / 'checkpoints' / '6')  # nothing written was lost
