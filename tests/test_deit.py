"""DeiT: sizes, the two heads, timm interop, the distillation losses and distillation training end
to end (tiny models; timm built with random, perturbed weights)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import assert_close_to_scale, assert_logits_match
from tests.test_train import digest, run_main, tiny_config
from vit_jax import sharding as sharding_lib
from vit_jax.families import registry
from vit_jax.families.base import IMAGENET
from vit_jax.families.deit import FAMILY as DEIT
from vit_jax.families.deit_interop import INTEROP as DEIT_INTEROP
from vit_jax.models.deit import DistilledVisionTransformer
from vit_jax.models.params import count, flatten, unflatten
from vit_jax.objectives import distill as distill_lib, registry as objectives
from vit_jax.train import optim, state as state_lib, step as step_lib, validate

TINY = DEIT.models['DeiT-testing']  # patch 4, width 32, 2 layers, 2 heads, MLP 64
# timm 1.0.31 `deit_*_distilled_patch16_224` parameter counts at 224 px, 1000 classes.
COUNTS = {'DeiT-Ti_16-distilled': 5_910_800, 'DeiT-S_16-distilled': 22_436_432,
          'DeiT-B_16-distilled': 87_338_192}


def _images(h=16, w=16, c=3, n=2, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, (n, h, w, c)).astype(np.float32)


def _random_params(module, *inputs, seed=1, std=0.2):
  """Random parameters of the module's shapes (LayerNorm scales around 1), every one non-zero."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)['params']
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (float(path[-1].key == 'scale') + std * rng.normal(size=s.shape)).astype(
          np.float32), shapes)


def _model(num_classes=5, **kw) -> DistilledVisionTransformer:
  return registry.create_model({**TINY, 'family': 'deit'}, num_classes, **kw)


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_registered_sizes_have_timms_parameter_counts(name):
  model = registry.create_model(registry.get_model_config(name), 1000)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  assert count(shapes) == COUNTS[name]
  flat = flatten(shapes['params'])
  assert flat['dist_token'].shape == (1, 1, model.hidden_size)
  assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 2 + 14 * 14,
                                                                    model.hidden_size)


def test_forward_shapes_heads_and_features():
  model, x = _model(), _images(16, 24)
  params = model.init(jax.random.PRNGKey(0), x)['params']
  assert {'head', 'head_dist', 'dist_token', 'cls'} <= set(params)
  assert model.apply({'params': params}, x).shape == (2, 5)
  cls, dist = model.apply({'params': params}, x, return_both=True)
  assert cls.shape == dist.shape == (2, 5)
  feats = model.apply({'params': params}, x, features=True)
  assert len(feats) == 1 and feats[0].shape == (2, 4, 6, 32)
  headless = {k: v for k, v in params.items() if not k.startswith('head')}
  assert _model(num_classes=0).apply({'params': headless}, x).shape == (2, 32)
  with pytest.raises(ValueError, match="classifier must be 'token'"):
    _model(classifier='gap').init(jax.random.PRNGKey(0), x)


def test_eval_output_is_the_mean_of_both_heads():
  model, x = _model(), _images()
  params = _random_params(model, x)
  cls, dist = model.apply({'params': params}, x, return_both=True)
  assert np.abs(np.asarray(cls) - np.asarray(dist)).max() > 0.1  # the heads really differ
  out = model.apply({'params': params}, x)
  assert_close_to_scale(out, (np.asarray(cls) + np.asarray(dist)) / 2, 1e-6, 'eval logits')
  # `train` switches only dropout on; without dropout it returns the same mean.
  trained = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
  assert_close_to_scale(trained, out, 1e-6, 'train logits')


def test_family_detects_counts_and_refuses_other_formats():
  model, x = _model(), _images()
  flat = {k: np.asarray(v) for k, v in flatten(_random_params(model, x)).items()}
  assert registry.detect(flat).name == 'deit'
  vit_flat = {k: v for k, v in flat.items() if k not in ('dist_token',) and 'head_dist' not in k}
  assert registry.detect(vit_flat).name == 'vit'
  arch = DEIT.infer(flat)
  assert arch.family == 'deit' and arch.image_size == (16, 16) and arch.num_classes == 5
  assert {k: arch.model_config[k] for k in ('patch_size', 'hidden_size', 'num_layers')} == {
      'patch_size': 4, 'hidden_size': 32, 'num_layers': 2}
  # Two prefix tokens in attention, two heads: the head term is 2 * D * classes.
  macs = DEIT.forward_macs(TINY, 5, (16, 16))
  assert macs - DEIT.forward_macs(TINY, None, (16, 16)) == 2 * 32 * 5
  vit = registry.get_family('vit')
  assert macs - 2 * 32 * 5 > vit.forward_macs({**TINY, 'classifier': 'token'}, None, (16, 16))
  with pytest.raises(ValueError, match='DeiTForImageClassificationWithTeacher'):
    DEIT_INTEROP.to_hf(flat, arch)
  from vit_jax.convert.api import _write_npz  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match='Google released no .npz'):
    _write_npz('/nonexistent/x.npz', flat, arch, None)


# ---------- timm ----------

def _timm():
  from tests import interop  # pylint: disable=import-outside-toplevel
  return interop.require_timm()  # under scripts/test.sh a failure, not a skip


TIMM_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                 num_classes=5)


def _timm_model(timm, torch, seed=0):
  torch.manual_seed(seed)
  model = timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, **TIMM_ARGS)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def _run_timm(torch, model, images):
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    tokens = model.forward_features(x)
    return (model(x).numpy(), model.head(tokens[:, 0]).numpy(),
            model.head_dist(tokens[:, 1]).numpy())


def test_timm_checkpoint_gives_the_same_logits_and_round_trips(tmp_path):
  torch, timm = _timm()
  model = _timm_model(timm, torch)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  config = {'architecture': 'deit_tiny_distilled_patch16_224',
            'model_args': {**TIMM_ARGS, 'img_size': [16, 16]}}
  assert registry.interop_for_timm(config['architecture'], state) is DEIT_INTEROP
  flat, arch, _ = DEIT_INTEROP.from_timm(state, config)
  assert arch.family == 'deit' and arch.model_config['act'] == 'gelu'
  assert arch.mean == IMAGENET[0] and arch.std == IMAGENET[1]   # timm's DeiT normalisation
  images = _images(seed=3)
  ours = arch.create_model()
  params = unflatten(flat)
  mean = np.asarray(ours.apply({'params': params}, images))
  cls, dist = ours.apply({'params': params}, images, return_both=True)
  theirs = _run_timm(torch, model, images)
  for what, a, b in zip(('mean', 'head', 'head_dist'), (mean, cls, dist), theirs):
    diff = assert_logits_match(a, b, what=what)
    print(f'timm DeiT {what}: max |logit diff| {diff:.3g} (logits up to {np.abs(b).max():.3g})')
  # to_timm(from_timm(x)) is x, bitwise.
  back, back_config = DEIT_INTEROP.to_timm(flat, arch)
  assert set(back) == set(state)
  for k in state:
    assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
  # The written config.json rebuilds the same network in timm (strict loading).
  rebuilt = timm.create_model(back_config['architecture'], pretrained=False,
                              **back_config['model_args']).eval()
  rebuilt.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert np.abs(_run_timm(torch, rebuilt, images)[0] - theirs[0]).max() == 0.0


def test_timm_export_of_a_trained_style_model_reads_back(tmp_path):
  """Ours (sincos2d position embeddings) -> a timm directory -> timm and read_checkpoint."""
  torch, timm = _timm()
  from vit_jax.checkpoints import read_checkpoint  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import timm as timm_lib  # pylint: disable=import-outside-toplevel
  model, x = _model(posemb='sincos2d'), _images(seed=4)
  flat = {k: np.asarray(v) for k, v in flatten(_random_params(model, x, seed=5)).items()}
  arch = DEIT.infer(flat, model_config={**TINY, 'posemb': 'sincos2d'}, image_size=(16, 16))
  assert arch.model_config['posemb'] == 'sincos2d'
  ours = np.asarray(model.apply({'params': unflatten(flat)}, x))
  timm_lib.write_timm(tmp_path, flat, arch, class_names=list('abcde'))
  cfg = json.loads((tmp_path / 'config.json').read_text())
  theirs = timm.create_model(cfg['architecture'], pretrained=False, **cfg['model_args']).eval()
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  theirs.load_state_dict(load_file(str(tmp_path / 'model.safetensors')), strict=True)
  assert_logits_match(ours, _run_timm(torch, theirs, x)[0])
  ckpt = read_checkpoint(tmp_path)
  assert ckpt.architecture.family == 'deit' and ckpt.class_names == list('abcde')
  again = ckpt.architecture.create_model().apply({'params': unflatten(ckpt.params)}, x)
  # The same parameters read back and the same model: equal up to float32 rounding of O(1) logits.
  assert_close_to_scale(again, ours, rtol=1e-6, what='read back')


def test_fine_tuning_a_deit_checkpoint_at_a_new_size_and_class_count(tmp_path):
  """A DeiT timm directory initialises a DeiT with other classes at another resolution: both heads
  new (zero kernels), both prefix rows of the position table kept, the grid resampled."""
  from vit_jax.checkpoints import load_pretrained  # pylint: disable=import-outside-toplevel
  from vit_jax.formats import timm as timm_lib  # pylint: disable=import-outside-toplevel
  source, x = _model(), _images()
  flat = {k: np.asarray(v) for k, v in flatten(_random_params(source, x, seed=11)).items()}
  timm_lib.write_timm(tmp_path, flat, DEIT.infer(flat))
  target = _model(num_classes=3)
  init = target.init(jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))['params']
  params, report = load_pretrained(tmp_path, init, model=target, image_size=(24, 24), log=None)
  out = flatten(params)
  assert {'head/kernel', 'head_dist/kernel'} <= set(report.added)
  assert not np.any(out['head/kernel']) and not np.any(out['head_dist/kernel'])
  pe = out['Transformer/posembed_input/pos_embedding']
  assert pe.shape == (1, 2 + 36, 32)
  assert np.array_equal(pe[:, :2], flat['Transformer/posembed_input/pos_embedding'][:, :2])
  assert np.array_equal(out['dist_token'], flat['dist_token'])
  assert target.apply({'params': params}, _images(24, 24)).shape == (2, 3)


# ---------- distillation ----------

def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_distillation_losses_against_numpy():
  rng = np.random.RandomState(0)
  s, t = rng.normal(0, 2, (6, 7)).astype(np.float32), rng.normal(0, 2, (6, 7)).astype(np.float32)
  s64, t64 = s.astype(np.float64), t.astype(np.float64)
  hard = -np.mean(_log_softmax(s64)[np.arange(6), t64.argmax(-1)])
  np.testing.assert_allclose(distill_lib.distill_loss(s, t, 'hard'), hard, rtol=1e-5)
  for temp in (1.0, 3.0):
    log_p, log_q = _log_softmax(t64 / temp), _log_softmax(s64 / temp)
    soft = np.mean(np.sum(np.exp(log_p) * (log_p - log_q), -1)) * temp ** 2
    np.testing.assert_allclose(distill_lib.distill_loss(s, t, 'soft', temp), soft, rtol=1e-5)
  # A hand-worked case: equal student logits, teacher sure of class 0 -> log 2 (hard).
  np.testing.assert_allclose(distill_lib.distill_loss(np.zeros((1, 2)), np.array([[1.0, 0.0]]),
                                                   'hard'), np.log(2.0), rtol=1e-6)
  assert float(distill_lib.distill_loss(t, t, 'soft', 2.0)) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match='distill.kind'):
    distill_lib.distill_loss(s, t, 'medium')


def test_teacher_input_resizes_repeats_grey_and_renormalises():
  x = _images(8, 8, 1, seed=6)
  fn = distill_lib.teacher_input_fn((8, 8), 1, (16, 16), 3, *IMAGENET)
  out = np.asarray(fn(jnp.asarray(x)))
  assert out.shape == (2, 16, 16, 3)
  up = np.asarray(jax.image.resize(x, (2, 16, 16, 1), 'bilinear'))
  want = ((up + 1) / 2 - np.array(IMAGENET[0])) / np.array(IMAGENET[1])
  assert_close_to_scale(out, want, 1e-6, 'teacher input')
  same = distill_lib.teacher_input_fn((8, 8), 1, (8, 8), 1, (0.5,), (0.5,))
  assert np.array_equal(np.asarray(same(jnp.asarray(x))), x)
  with pytest.raises(ValueError, match='only grey to RGB'):
    distill_lib.teacher_input_fn((8, 8), 3, (8, 8), 1, (0.5,), (0.5,))


def _distill_setup(kind, alpha, accum=1):
  student = _model(head_zeroinit=False)
  teacher = registry.create_model(registry.get_model_config('ViT-testing'), 5, head_zeroinit=False)
  tparams = _random_params(teacher, jnp.zeros((1, 16, 16, 3)), seed=7, std=0.3)
  sched = optim.make_schedule(0.1, 100, 0, 'constant')
  tx = optim.make_optimizer(dict(optimizer='sgd', momentum=0.0), sched)
  mesh = sharding_lib.make_mesh((('data', -1),))
  state, shardings = state_lib.create_train_state(student, tx, (1, 8, 8, 3), 0, mesh)
  tshard = sharding_lib.tree_shardings(tparams, mesh, 2 ** 14,
                                       registry.get_family('vit').tensor_rules)
  input_fn = distill_lib.teacher_input_fn((8, 8), 3, (16, 16), 3, *IMAGENET)
  distill = distill_lib.Distillation(teacher, jax.device_put(tparams, tshard), tshard, input_fn,
                                     kind, alpha, 2.0)
  objective = objectives.from_keywords(student, label_smoothing=0.1, distill=distill)
  step = step_lib.make_train_step(student, tx, sched, mesh, shardings, objective=objective,
                                  accum_steps=accum)
  return student, teacher, tparams, state, step, distill


@pytest.mark.parametrize('kind', ['hard', 'soft'])
def test_train_step_combines_label_and_teacher_losses(kind):
  student, teacher, tparams, state, step, distill = _distill_setup(kind, 0.3)
  rng = np.random.RandomState(8)
  batch = {'image': jnp.asarray(_images(8, 8, n=4, seed=9)),
           'labels': jax.nn.one_hot(rng.randint(0, 5, 4), 5)}
  p0 = jax.device_get(state.params)
  cls, dist = student.apply({'params': p0}, batch['image'], return_both=True)
  t_logits = np.asarray(teacher.apply({'params': tparams}, distill.input_fn(batch['image'])))
  targets = np.asarray(batch['labels']) * 0.9 + 0.1 / 5
  want_cls = -np.mean(np.sum(targets * _log_softmax(np.asarray(cls, np.float64)), -1))
  want_kd = float(distill_lib.distill_loss(dist, t_logits, kind, 2.0))
  _, m = step(state, batch)
  np.testing.assert_allclose(m['cls_loss'], want_cls, rtol=1e-5)
  np.testing.assert_allclose(m['distill_loss'], want_kd, rtol=1e-5)
  np.testing.assert_allclose(m['loss'], 0.7 * want_cls + 0.3 * want_kd, rtol=1e-5)
  # Two micro-batches of two: the same means.
  *_, state2, step2, _ = _distill_setup(kind, 0.3, accum=2)
  _, m2 = step2(state2, batch)
  for key in ('loss', 'cls_loss', 'distill_loss'):
    np.testing.assert_allclose(m2[key], m[key], rtol=1e-5)


def test_each_head_learns_only_its_target():
  """alpha = 1: only the teacher's loss, so the class head gets no gradient; alpha = 0: only the
  labels, so the distillation head gets none. The teacher's parameters never change."""
  for alpha, frozen, moved in ((1.0, 'head', 'head_dist'), (0.0, 'head_dist', 'head')):
    _, _, tparams, state, step, distill = _distill_setup('hard', alpha)
    p0 = jax.device_get(state.params)
    batch = {'image': jnp.asarray(_images(8, 8, n=4, seed=10)),
             'labels': jax.nn.one_hot(np.arange(4) % 5, 5)}
    state, _ = step(state, batch)
    p1 = jax.device_get(state.params)
    assert np.array_equal(p1[frozen]['kernel'], p0[frozen]['kernel'])
    assert not np.array_equal(p1[moved]['kernel'], p0[moved]['kernel'])
    assert set(p1) == set(p0)
    for a, b in zip(jax.tree.leaves(jax.device_get(distill.params)), jax.tree.leaves(tparams)):
      assert np.array_equal(a, b)


def test_validate_distill_config(tmp_path):
  good = tiny_config(**{'model.name': 'DeiT-testing', 'model.classifier': 'token',
                        'distill.teacher': str(tmp_path)})
  validate.validate(good)
  for overrides, message in (
      ({'distill.kind': 'medium'}, 'distill.kind'),
      ({'distill.alpha': 1.5}, 'distill.alpha'),
      ({'distill.temperature': 0.0}, 'distill.temperature'),
      ({'model.name': 'ViT-testing', 'model.classifier': 'gap'}, 'has no distillation head'),
      ({'distill.teacher': str(tmp_path / 'missing')}, 'does not exist'),
      ({'model.classifier': 'gap'}, "must be 'token'")):
    bad = tiny_config(**{'model.name': 'DeiT-testing', 'model.classifier': 'token',
                         'distill.teacher': str(tmp_path), **overrides})
    with pytest.raises(validate.ConfigError, match=message):
      validate.validate(bad)


def test_distill_config_file_builds():
  from configs import distill_fashion_mnist  # pylint: disable=import-outside-toplevel
  from configs import quickstart  # pylint: disable=import-outside-toplevel
  c = distill_fashion_mnist.get_config('teacher=/some/run,kind=soft')
  q = quickstart.get_config('model=ViT-Mini_7')  # the teacher's recipe
  assert c.distill.teacher == '/some/run' and c.distill.kind == 'soft'
  for key in ('total_steps', 'batch_size', 'base_lr', 'warmup_steps', 'weight_decay', 'augment'):
    assert c[key] == q[key], key
  family, fields = registry.resolve(c.model)
  assert family.name == 'deit' and fields['classifier'] == 'token'
  assert (fields['patch_size'], fields['hidden_size'], fields['num_layers'], fields['num_heads'],
          fields['mlp_dim']) == (7, 128, 6, 4, 256)


def test_distillation_run_end_to_end(tmp_path):
  """A ViT teacher trained here, then a DeiT student distilled from its workdir with main: the
  teacher's checkpoint is untouched and absent from the student's, and distill_loss is logged."""
  teacher = tmp_path / 'teacher'
  run_main(teacher, '--config.total_steps=30', '--config.eval_every=0',
           '--config.checkpoint_every=30', '--config.log_every=30')
  before = digest(teacher)
  teacher_files = sorted(os.listdir(teacher / 'checkpoints'))
  student = tmp_path / 'student'
  run_main(student, '--config.model.name=DeiT-testing', '--config.model.classifier=token',
           f'--config.distill.teacher={teacher}', '--config.distill.kind=soft',
           '--config.total_steps=10', '--config.eval_every=10', '--config.checkpoint_every=10',
           '--config.log_every=5')
  assert digest(teacher) == before and sorted(os.listdir(teacher / 'checkpoints')) == teacher_files
  rows = [json.loads(l) for l in (student / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows] == [5, 10]
  for r in rows:
    assert r['distill_loss'] > 0 and r['cls_loss'] > 0
    assert r['loss'] == pytest.approx(0.5 * r['cls_loss'] + 0.5 * r['distill_loss'], rel=1e-5)
  assert 'eval_top1' in rows[-1]
  from vit_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  params, meta = manager.load_params(str(student))
  assert meta['architecture']['family'] == 'deit'
  want = registry.create_model(registry.get_model_config('DeiT-testing'), 10, patch_size=2,
                               posemb='sincos2d')  # the quickstart's
  shapes = jax.eval_shape(want.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))['params']
  assert {k: v.shape for k, v in flatten(params).items()} == {
      k: v.shape for k, v in flatten(shapes).items()}
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  step_dir = os.path.join(student, 'checkpoints', '10', 'state')
  with ocp.PyTreeCheckpointer() as ckptr:
    meta_tree = ckptr.metadata(step_dir)
  tree = meta_tree.item_metadata.tree if hasattr(meta_tree, 'item_metadata') else meta_tree.tree
  assert set(tree) <= {'step', 'params', 'opt_state', 'rng', 'ema_params'}, set(tree)
