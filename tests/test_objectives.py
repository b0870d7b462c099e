"""The training-objective seam (vit_jax/objectives), tested by registering, as tests/test_families.py
tests families: every registered objective against every registered family's tiny model either
trains through `build_training` (the assembly training and plans use) or is refused before anything
compiles, naming the family and its reason; plus the registry, the config blocks, and what the
trainer does with an objective's parameters, frozen extras and best-checkpoint metric."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import objectives
from vit_jax import sharding as sharding_lib
from vit_jax.families import registry
from vit_jax.models import params as params_lib
from vit_jax.objectives import base as base_lib
from vit_jax.objectives import distill as distill_lib
from vit_jax.train import build as build_lib
from vit_jax.train import state as state_lib
from vit_jax.train import validate

OBJECTIVES = ('classify', 'distill', 'mpp', 'mae', 'prompt')
FAMILIES = [f.name for f in registry.families()]


def config_for(family_name: str, objective: str, **overrides):
  """A tiny config of the family's test model under `objective` (the trainer's real config)."""
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  family = registry.get_family(family_name)
  c = quickstart.get_config(f'model={family.test_model}')
  c.model.classifier = None
  c.model.posemb = None
  values = {'image_size': family.test_image_size, 'channels': 3, 'batch_size': 4,
            'eval_batch_size': 4, 'total_steps': 10, 'warmup_steps': 1, 'base_lr': 1e-2,
            'objective.name': objective, 'mae.decoder_width': 16, 'mae.decoder_depth': 1,
            'mae.decoder_heads': 2, 'mae.decoder_mlp_dim': 32, 'prompt.num_tokens': 3,
            'prompt.deep': True, 'pretrained': '/not/read/by/this/test' if objective == 'prompt'
            else None, **overrides}  # (a prompt run's backbone is given as frozen extras)
  for key, value in values.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def test_every_objective_is_registered_with_its_config_block():
  assert objectives.names() == list(OBJECTIVES)
  blocks = objectives.config_blocks()
  assert set(blocks) == {'distill', 'mpp', 'mae', 'prompt'}
  from configs import common  # pylint: disable=import-outside-toplevel
  c = common.get_config()
  assert c.objective.name == 'classify'
  for key, defaults in blocks.items():
    assert set(c[key]) == set(defaults), key
  # Each objective's summary and metric are declared; the metric direction is one of two.
  for name in OBJECTIVES:
    cls = objectives.get(name)
    assert cls.summary and cls.best_mode in ('max', 'min')


def test_an_unknown_objective_is_refused_naming_the_registered_ones():
  c = config_for('vit', 'classify')
  c.objective.name = 'contrastive'
  with pytest.raises(validate.ConfigError, match="'contrastive'.*classify"):
    validate.validate(c)


@pytest.mark.parametrize('objective', OBJECTIVES)
@pytest.mark.parametrize('family_name', FAMILIES)
def test_every_objective_trains_every_family_that_serves_it(objective, family_name):
  """A family that has the capabilities trains two steps whose loss is finite and whose
  parameters move; one that lacks them is refused by `validate` (before anything compiles) with
  the family's name and reason."""
  family = registry.get_family(family_name)
  cls = objectives.get(objective)
  c = config_for(family_name, objective)
  why = family.missing_capability(cls.needs)
  if objective == 'distill':
    c.distill.teacher = '.'  # any existing path: the teacher is given below
  if why:
    with pytest.raises(validate.ConfigError, match=f'{family_name} family cannot serve it'):
      validate.validate(c)
    assert family.lacks.get(cls.needs[0]) or 'does not provide' in why
    return
  validate.validate(c)
  kwargs = {}
  if objective == 'distill':
    teacher_model = registry.create_model(registry.get_model_config('ViT-testing'), 10)
    s = family.test_image_size
    tparams = teacher_model.init(jax.random.PRNGKey(3), jnp.zeros((1, s, s, 3)))['params']
    mesh = sharding_lib.make_mesh((('data', -1),))
    shard = sharding_lib.tree_shardings(tparams, mesh)
    kwargs['teacher'] = distill_lib.Distillation(
        teacher_model, jax.device_put(tparams, shard), shard, lambda x: x)
  built = _build(c, kwargs)
  state, _ = state_lib.create_train_state(
      built.model, built.tx, built.input_shape, 0, built.mesh, objective=built.objective,
      tensor_rules=built.family.tensor_rules)
  if built.objective.freezes():  # the frozen backbone: here a fresh initialisation
    tree = built.model.init(jax.random.PRNGKey(5), jnp.zeros(built.input_shape))['params']
    built = built.with_frozen(built.objective.frozen_params(tree))
  batch = {k: jax.random.uniform(jax.random.PRNGKey(i), v.shape, v.dtype, -1, 1)
           for i, (k, v) in enumerate(built.abstract_batch().items())}
  if 'labels' in batch:
    batch['labels'] = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  p0 = jax.device_get(state.params)
  for _ in range(2):
    state, metrics = built.train_step(state, batch)
  assert np.isfinite(float(metrics['loss']))
  assert set(metrics) >= {'loss', 'grad_norm', 'lr', *cls.metrics}
  moved = [k for k, v in params_lib.flatten(jax.device_get(state.params)).items()
           if not np.array_equal(v, params_lib.flatten(p0)[k])]
  assert moved, 'no parameter moved'
  # Evaluation: the objective's sums, summarised under its best metric.
  eval_batch = {'image': batch['image'], 'mask': jnp.array([True, True, True, False])}
  if built.objective.eval_labels():
    eval_batch['label'] = jnp.arange(4, dtype=jnp.int32)
  summary = built.objective.eval_summary(jax.device_get(built.eval_step(state.params, eval_batch)))
  assert summary['eval_count'] == 3 and np.isfinite(summary[cls.best_metric])


def _build(config, kwargs):
  """build_training with the objective made here (a teacher placed in memory)."""
  family, fields = registry.resolve(config.model)
  objective = objectives.create(config, family, fields, 10, **kwargs)
  return build_lib.build_training(config, 10, objective=objective)


def test_refusals_name_the_family_and_the_reason():
  for family_name, objective, reason in (
      ('swin', 'mae', 'full patch grid'), ('hybrid', 'mpp', 'receptive field'),
      ('mixer', 'prompt', 'weight per token position'), ('vit', 'distill', 'distillation head')):
    c = config_for(family_name, objective)
    c.distill.teacher = '.'
    with pytest.raises(validate.ConfigError, match=reason):
      validate.validate(c)


def test_a_plan_teacher_counts_its_forward_pass_and_needs_a_two_headed_student():
  """`teacher_model` (a plan of distillation without a checkpoint): the teacher as shapes, its
  forward MACs the objective's frozen extras' (the plan adds them once, without a backward)."""
  c = config_for('deit', 'classify')
  built = build_lib.build_training(c, 10, abstract=True, teacher_model='ViT-testing')
  assert built.objective.name == 'distill'
  assert isinstance(jax.tree.leaves(built.extras['teacher'])[0], jax.ShapeDtypeStruct)
  vit = registry.get_family('vit')
  fields = dict(registry.get_model_config('ViT-testing'))
  size = (c.image_size, c.image_size)
  want = vit.forward_macs(fields, 10, size, c.channels)
  assert want > 0 and built.objective.frozen_macs(10, size, c.channels) == want
  assert objectives.create(c, *registry.resolve(c.model), 10).frozen_macs(10, size, 3) == 0
  with pytest.raises(ValueError, match='distillation head'):
    build_lib.build_training(config_for('vit', 'classify'), 10, abstract=True,
                             teacher_model='ViT-testing')


def test_a_label_free_objective_refuses_label_mixing():
  for key in ('mixup', 'label_smoothing'):
    c = config_for('vit', 'mpp', **{key: 0.1})
    with pytest.raises(validate.ConfigError, match=f'{key}.*without them'):
      validate.validate(c)


def test_split_and_merge_are_inverse_and_frozen_never_overlaps():
  tree = {'a': {'b': 1, 'c': 2}, 'head': {'kernel': 3}}
  yes, no = base_lib.split(tree, lambda p: p.startswith('head/'))
  assert yes == {'head': {'kernel': 3}} and no == {'a': {'b': 1, 'c': 2}}
  assert base_lib.merge(no, yes) == tree
  with pytest.raises(ValueError, match='both trainable and frozen'):
    base_lib.merge(tree, yes)
  params = {'head': {'kernel': 3}, objectives.OBJECTIVE_KEY: {'prompts': 4}}
  assert base_lib.model_params(params, {'frozen': no}) == tree
  assert base_lib.own_params(params) == {'prompts': 4}


def test_abstract_plan_of_a_frozen_backbone_has_no_optimizer_state_for_it():
  """`build_training(abstract=True)` (what plans compile) puts a freezing objective's frozen
  parameters in the extras as shapes, and its state holds the trained ones only."""
  c = config_for('vit', 'prompt')
  built = build_lib.build_training(c, 10, abstract=True)
  frozen = params_lib.flatten(built.extras['frozen'])
  trained = params_lib.flatten(built.abstract_state.params)
  assert sorted(trained) == ['head/bias', 'head/kernel', 'objective/prompts']
  assert 'Transformer/encoder_norm/scale' in frozen and not set(frozen) & set(trained)
  opt_leaves = jax.tree.leaves(built.abstract_state.opt_state)
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * sum(x.size for x in trained.values())
  built.lower()  # compiles against abstract extras without allocating anything


def test_checkpoint_manager_keeps_the_best_by_the_objective_metric(tmp_path):
  from vit_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  m = manager.CheckpointManager(str(tmp_path), keep_last=1, best_metric='eval_loss',
                                best_mode='min', async_save=False)
  state = {'x': np.zeros(2, np.float32)}
  for step, loss in ((1, 0.5), (2, 0.2), (3, 0.9), (4, 0.7)):
    m.save(step, state, {}, {}, {'eval_loss': loss})
  m.wait()
  assert m.all_steps() == [2, 4]  # the lowest loss and the latest
  m.close()
  with pytest.raises(ValueError, match="'max' or 'min'"):
    manager.CheckpointManager(str(tmp_path / 'x'), best_mode='lowest')


# ---- end to end through `python -m vit_jax.main` (slow) ----

OBJECTIVE_ARGS = {
    'mpp': ['--config.objective.name=mpp'],
    'mae': ['--config.objective.name=mae', '--config.mae.decoder_width=16',
            '--config.mae.decoder_depth=1', '--config.mae.decoder_heads=2',
            '--config.mae.decoder_mlp_dim=32', '--config.model.posemb=sincos2d'],
    'prompt': ['--config.objective.name=prompt', '--config.prompt.num_tokens=2',
               '--config.prompt.deep=True'],
}
MAIN = ['--config=configs/fashion_mnist_compare.py:model=ViT-testing', '--config.dataset=digits',
        '--config.image_size=16', '--config.channels=1', '--config.batch_size=32',
        '--config.warmup_steps=0', '--config.lr_decay=constant', '--config.optimizer=sgd',
        '--config.weight_decay=0.0', '--config.base_lr=0.05', '--config.augment=none',
        '--config.log_every=1', '--config.eval_every=0', '--config.eval_batch_size=360',
        '--config.fsdp_min_size=64', '--config.progress=False', '--config.model.dropout_rate=0.1']


def _objective_cmd(objective, workdir, backbone, *extra):
  import sys  # pylint: disable=import-outside-toplevel
  args = [*MAIN, *OBJECTIVE_ARGS[objective], *extra]
  if objective == 'prompt':
    args.append(f'--config.pretrained={backbone}')
  return [sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *args]


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  """A 4-step supervised run: the frozen backbone of the prompt-tuning runs."""
  from tests import sharding_worker as worker  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp('backbone') / 'run'
  cmd = _objective_cmd('mpp', path, None, '--config.total_steps=4', '--config.checkpoint_every=4')
  cmd = [a for a in cmd if a != '--config.objective.name=mpp']
  worker.check_ok(worker.run_all([cmd], timeout=300, envs=[worker.worker_env()]))
  return path


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['mpp', 'mae', 'prompt'])
def test_objective_trains_on_8_devices_like_one_and_resumes_bitwise(objective, backbone, tmp_path):
  """Through `python -m vit_jax.main`: (1) 8 fake devices with data, FSDP and tensor axes at once
  against one device, the same losses and parameters (1e-3 relative, as the families' test); (2)
  five steps, then a restart of the same command to ten, bitwise equal to ten straight."""
  import json  # pylint: disable=import-outside-toplevel
  from tests import sharding_worker as worker  # pylint: disable=import-outside-toplevel
  from tests.numerics import assert_trees_close_to_scale  # pylint: disable=import-outside-toplevel
  from vit_jax.checkpoints.manager import load_params, params_digest  # pylint: disable=import-outside-toplevel
  one = _objective_cmd(objective, tmp_path / 'one', backbone, '--config.total_steps=10',
                       '--config.checkpoint_every=5', "--config.mesh=(('data',-1),)")
  eight = _objective_cmd(objective, tmp_path / 'eight', backbone, '--config.total_steps=10',
                         '--config.checkpoint_every=5',
                         "--config.mesh=(('data',2),('fsdp',2),('tensor',2))")
  half = _objective_cmd(objective, tmp_path / 'resumed', backbone, '--config.total_steps=5',
                        '--config.checkpoint_every=5')
  envs = [worker.worker_env(XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
          for n in (1, 8, 1)]
  worker.check_ok(worker.run_all([one, eight, half], timeout=600, envs=envs))
  rest = _objective_cmd(objective, tmp_path / 'resumed', backbone, '--config.total_steps=10',
                        '--config.checkpoint_every=5')
  worker.check_ok(worker.run_all([rest], timeout=600, envs=envs[:1]))
  runs = {}
  for name in ('one', 'eight', 'resumed'):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      losses = np.array([json.loads(line)['loss'] for line in f])
    runs[name] = (losses, load_params(str(tmp_path / name))[0])
  (ref_losses, ref), (losses, got) = runs['one'], runs['eight']
  assert len(ref_losses) == 10 and np.all(np.isfinite(ref_losses))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
  assert_trees_close_to_scale(params_lib.flatten_numpy(got), params_lib.flatten_numpy(ref), 1e-3)
  assert params_digest(runs['resumed'][1]) == params_digest(ref)
  np.testing.assert_array_equal(runs['resumed'][0], ref_losses)


@pytest.mark.parametrize('name', ['mpp', 'mae'])
def test_the_pretraining_recipes_validate_and_build(name):
  """configs/mpp.py and configs/mae.py: the papers' recipes, valid, at any model and dataset."""
  import importlib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f'configs.{name}').get_config('model=ViT-testing,dataset=digits')
  assert c.objective.name == name and c.optimizer == 'adam' and c.batch_size == 4096
  validate.validate(c)
  c.batch_size, c.image_size, c.channels = 8, 16, 1
  c.model.patch_size = 4
  built = build_lib.build_training(c, 10, abstract=True)
  assert 'head' not in built.abstract_state.params  # an encoder, no classifier
  assert objectives.OBJECTIVE_KEY in built.abstract_state.params
  assert set(built.abstract_batch()) == {'image'}  # no labels read
