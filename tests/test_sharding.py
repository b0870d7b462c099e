"""The sharding rules (mesh resolution, tensor-parallel and FSDP specs, optimizer state follows its
parameter) and the equivalence of data / FSDP / tensor parallel training with one device.

The rule tests run in this process on `AbstractMesh`es, which need no devices. The equivalence test
runs tests/sharding_worker.py in a subprocess with 8 CPU devices (XLA_FLAGS must be set before JAX
starts, and this pytest process may already have started it with one).

Tolerances of the equivalence test (the worker's LOSS_RTOL, PARAM_RTOL, PARAM_ATOL):
  losses and gradient norms: 1e-5 relative. A sharded run computes the same float32 mathematics;
    only the order of reductions changes (per-device partial sums of the batch mean, of the
    contraction over heads in the row-parallel `out` and `Dense_1` kernels, of the FSDP
    reduce-scatter), which moves a float32 result by a few ulps (~1e-7 relative) per step. 20 steps
    of Adam with clipping keep it there: measured <= 2.2e-7 on the losses, <= 9.3e-7 on the
    gradient norms. A real error (a gradient summed twice, a shard averaged with the wrong one)
    changes the loss from the second step by >= 1e-3.
  parameters: |a - b| <= 1e-5 + 1e-4 |b|. Measured <= 1.5e-6 absolute; a parameter moves by up to
    lr = 1e-3 each step, so a wrong update to one step of one shard exceeds this 100-fold.
  the first global batch: bitwise equal (it is data, not arithmetic).
  The attention key bias is left out: its true gradient is exactly zero (see
  sharding_worker.ZERO_GRADIENT) and Adam turns its rounding noise into +-lr steps in every run.
"""
import logging
import math
import tempfile

import jax
from jax.sharding import AbstractMesh, PartitionSpec as P
import numpy as np
import pytest

from tests import sharding_worker as worker
from vit_jax import sharding as sharding_lib
from vit_jax.families.vit import TENSOR_RULES as VIT_RULES
from vit_jax.models import VisionTransformer
from vit_jax.train import optim
from vit_jax.train import state as state_lib

ATTN = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1'
MLP = 'Transformer/encoderblock_0/MlpBlock_3'
SATTN = 'Transformer/encoderblock/MultiHeadDotProductAttention_1'  # scanned: leading [layers]
SMLP = 'Transformer/encoderblock/MlpBlock_3'


def abstract_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), sharding_lib.AXES)


def tiny_model(scan: bool = False, layers: int = 2) -> VisionTransformer:
  """hidden 32, 4 heads of 8, MLP 64: the shapes the rules are checked against below."""
  return VisionTransformer(num_classes=10, patch_size=4, hidden_size=32, num_layers=layers,
                           num_heads=4, mlp_dim=64, head_zeroinit=False, scan=scan)


def abstract_state(model, optimizer: str = 'adam', use_ema: bool = False, **opt):
  config = dict(optimizer=optimizer, grad_clip_norm=1.0, weight_decay=0.1 if optimizer == 'adam'
                else 0.0, **opt)
  tx = optim.make_optimizer(config, optim.make_schedule(1e-3, 10))
  return jax.eval_shape(state_lib.init_fn(model, tx, (1, 16, 16, 3), 0, use_ema))


def specs(tree, mesh, fsdp_min_size: int = 2 ** 14) -> dict[str, P]:
  """{path: PartitionSpec} with trailing Nones dropped, so P(None, 'x', None) == P(None, 'x')."""
  out = {}
  for path, s in jax.tree_util.tree_flatten_with_path(
      sharding_lib.tree_shardings(tree, mesh, fsdp_min_size, VIT_RULES))[0]:
    spec = list(s.spec)
    while spec and spec[-1] is None:
      spec.pop()
    out[sharding_lib._path_str(path)] = P(*spec)  # pylint: disable=protected-access
  return out


# ---------------------------------------------------------------------------------------------
# The mesh.

@pytest.mark.parametrize('spec, n, expected', [
    ((('data', -1),), 8, {'data': 8, 'fsdp': 1, 'tensor': 1}),
    ((('data', -1), ('fsdp', 1), ('tensor', 1)), 1, {'data': 1, 'fsdp': 1, 'tensor': 1}),
    ((('data', -1), ('fsdp', 4)), 8, {'data': 2, 'fsdp': 4, 'tensor': 1}),
    ((('data', 2), ('tensor', -1)), 8, {'data': 2, 'fsdp': 1, 'tensor': 4}),
    ((('fsdp', 2), ('data', 2), ('tensor', 2)), 8, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ((('fsdp', -1),), 4, {'data': 1, 'fsdp': 4, 'tensor': 1}),
])
def test_mesh_shape_resolves_minus_one_and_defaults_missing_axes_to_one(spec, n, expected):
  assert sharding_lib.mesh_shape(spec, n) == expected


@pytest.mark.parametrize('spec, n, message', [
    ((('batch', -1),), 8, 'distinct names'),
    ((('data', 2), ('data', 4)), 8, 'distinct names'),
    ((('data', -1), ('fsdp', -1)), 8, 'at most one'),
    ((('data', -1), ('fsdp', 3)), 8, 'do not divide'),
    ((('data', 2), ('fsdp', 2)), 8, 'needs 4 devices'),
    ((('data', 16),), 8, 'needs 16 devices'),
])
def test_mesh_shape_errors_name_the_problem(spec, n, message):
  with pytest.raises(ValueError, match=message):
    sharding_lib.mesh_shape(spec, n)


def test_make_mesh_has_the_three_axes_in_order():
  mesh = sharding_lib.make_mesh((('data', -1),), jax.devices()[:1])
  assert mesh.axis_names == sharding_lib.AXES
  assert dict(mesh.shape) == {'data': 1, 'fsdp': 1, 'tensor': 1}
  assert sharding_lib.batch_sharding(mesh).spec == P(('data', 'fsdp'))
  with pytest.raises(ValueError, match='needs'):
    sharding_lib.make_mesh((('data', len(jax.devices()) + 1),))


# ---------------------------------------------------------------------------------------------
# Tensor parallelism (Megatron): heads of q/k/v/out, hidden units of the MLP.

TENSOR_UNSCANNED = {
    f'{ATTN}/query/kernel': P(None, 'tensor'),      # [D, heads, K]
    f'{ATTN}/key/kernel': P(None, 'tensor'),
    f'{ATTN}/value/kernel': P(None, 'tensor'),
    f'{ATTN}/query/bias': P('tensor'),              # [heads, K]
    f'{ATTN}/value/bias': P('tensor'),
    f'{ATTN}/out/kernel': P('tensor'),              # [heads, K, D]: row parallel
    f'{ATTN}/out/bias': P(),                        # [D]: added after the all-reduce
    f'{MLP}/Dense_0/kernel': P(None, 'tensor'),     # [D, M]: column parallel
    f'{MLP}/Dense_0/bias': P('tensor'),             # [M]
    f'{MLP}/Dense_1/kernel': P('tensor'),           # [M, D]: row parallel
    f'{MLP}/Dense_1/bias': P(),
    'Transformer/encoderblock_0/LayerNorm_0/scale': P(),
    'embedding/kernel': P(),
    'head/kernel': P(),
    'Transformer/posembed_input/pos_embedding': P(),
}


def test_tensor_rules_split_heads_and_mlp_hidden_units():
  params = abstract_state(tiny_model()).params
  got = specs(params, abstract_mesh(tensor=4))
  for path, spec in TENSOR_UNSCANNED.items():
    assert got[path] == spec, path
  # Every block gets the rules, not only the first.
  assert got[ATTN.replace('_0', '_1') + '/query/kernel'] == P(None, 'tensor')


def test_tensor_rules_skip_the_leading_layer_axis_of_scanned_blocks():
  params = abstract_state(tiny_model(scan=True, layers=4)).params
  assert params['Transformer']['encoderblock']['MlpBlock_3']['Dense_0']['kernel'].shape == (4, 32, 64)
  got = specs(params, abstract_mesh(tensor=4))
  assert got[f'{SATTN}/query/kernel'] == P(None, None, 'tensor')   # [L, D, heads, K]
  assert got[f'{SATTN}/key/bias'] == P(None, 'tensor')             # [L, heads, K]
  assert got[f'{SATTN}/out/kernel'] == P(None, 'tensor')           # [L, heads, K, D]
  assert got[f'{SATTN}/out/bias'] == P()
  assert got[f'{SMLP}/Dense_0/kernel'] == P(None, None, 'tensor')  # [L, D, M]
  assert got[f'{SMLP}/Dense_0/bias'] == P(None, 'tensor')          # [L, M]
  assert got[f'{SMLP}/Dense_1/kernel'] == P(None, 'tensor')        # [L, M, D]
  assert got['Transformer/encoderblock/LayerNorm_0/scale'] == P()


def test_tensor_axis_that_does_not_divide_the_heads_replicates_with_a_warning(caplog):
  params = abstract_state(tiny_model()).params  # 4 heads, MLP 64
  with caplog.at_level(logging.WARNING):
    got = specs(params, abstract_mesh(tensor=8))
  assert got[f'{ATTN}/query/kernel'] == P()
  assert got[f'{MLP}/Dense_0/kernel'] == P(None, 'tensor')  # 64 hidden units do divide by 8
  assert 'not divisible by tensor=8' in caplog.text


def test_no_tensor_axis_means_no_tensor_rules():
  params = abstract_state(tiny_model()).params
  assert set(specs(params, abstract_mesh(data=8)).values()) == {P()}


# ---------------------------------------------------------------------------------------------
# FSDP (big_vision): the largest dimension divisible by the fsdp axis, if the leaf is big enough.

@pytest.mark.parametrize('shape, expected', [
    ((6, 8, 12), P(None, None, 'fsdp')),       # largest divisible dimension
    ((12, 8, 6), P('fsdp')),
    ((10, 8), P(None, 'fsdp')),                # the largest (10) does not divide: the next one
    ((8, 8), P(None, 'fsdp')),                 # ties: the last (keeps a scanned [L] axis whole)
    ((3, 5, 7), P()),                          # nothing divides: replicated
    ((), P()),                                 # scalars (step, Adam's count)
])
def test_fsdp_picks_the_largest_divisible_dimension(shape, expected):
  tree = {'w': jax.ShapeDtypeStruct(shape, np.float32)}
  assert specs(tree, abstract_mesh(fsdp=4), fsdp_min_size=1)['w'] == expected


def test_fsdp_min_size_keeps_small_leaves_replicated():
  tree = {'small': jax.ShapeDtypeStruct((4, 15), np.float32),   # 60 < 64
          'edge': jax.ShapeDtypeStruct((4, 16), np.float32),    # 64: big enough
          'big': jax.ShapeDtypeStruct((4, 1024), np.float32)}
  got = specs(tree, abstract_mesh(data=2, fsdp=4), fsdp_min_size=64)
  assert got == {'small': P(), 'edge': P(None, 'fsdp'), 'big': P(None, 'fsdp')}
  # The default (2**14) keeps a tiny model's parameters whole; 'big' has 4096 elements.
  assert specs(tree, abstract_mesh(fsdp=4))['big'] == P()


def test_fsdp_on_the_model_shards_every_large_parameter():
  params = abstract_state(tiny_model()).params
  got = specs(params, abstract_mesh(data=2, fsdp=4), fsdp_min_size=64)
  assert got[f'{ATTN}/query/kernel'] == P('fsdp')               # [32, 4, 8]: 32
  assert got[f'{ATTN}/out/kernel'] == P(None, None, 'fsdp')     # [4, 8, 32]: 32
  assert got[f'{MLP}/Dense_0/kernel'] == P(None, 'fsdp')        # [32, 64]: 64
  assert got[f'{MLP}/Dense_1/kernel'] == P('fsdp')              # [64, 32]: 64
  assert got['embedding/kernel'] == P(None, None, None, 'fsdp')  # [4, 4, 3, 32]
  assert got[f'{ATTN}/query/bias'] == P()                       # [4, 8]: 32 < 64
  assert got['head/bias'] == P()                                # [10]: small, 4 does not divide
  # No leaf of at least 64 elements with a dimension divisible by 4 is left whole.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in flat:
    if leaf.size >= 64 and any(d % 4 == 0 for d in leaf.shape):
      assert 'fsdp' in got[sharding_lib._path_str(path)], path  # pylint: disable=protected-access


def test_fsdp_and_tensor_combine_on_different_dimensions():
  params = abstract_state(tiny_model()).params
  got = specs(params, abstract_mesh(fsdp=2, tensor=4), fsdp_min_size=64)
  assert got[f'{ATTN}/query/kernel'] == P('fsdp', 'tensor')     # [D, heads, K]
  assert got[f'{MLP}/Dense_0/kernel'] == P('fsdp', 'tensor')    # [D, M]: M is tensor's
  assert got[f'{MLP}/Dense_1/kernel'] == P('tensor', 'fsdp')    # [M, D]


# ---------------------------------------------------------------------------------------------
# Optimizer moments (and the EMA) follow their parameter.

@pytest.mark.parametrize('optimizer, opt', [('adam', {}), ('adam', {'mu_dtype': 'bfloat16'}),
                                            ('sgd', {})])
@pytest.mark.parametrize('mesh_axes', [dict(data=2, fsdp=4), dict(tensor=4),
                                       dict(fsdp=2, tensor=4)])
@pytest.mark.parametrize('scan', [False, True])
def test_optimizer_state_and_ema_get_the_spec_of_their_parameter(optimizer, opt, mesh_axes, scan):
  state = abstract_state(tiny_model(scan=scan), optimizer, use_ema=True, **opt)
  got = specs(state, abstract_mesh(**mesh_axes), fsdp_min_size=64)
  param_specs = {k[len('params/'):]: v for k, v in got.items() if k.startswith('params/')}
  assert any(v != P() for v in param_specs.values())
  followers = 0
  for path, spec in got.items():
    if path.startswith('params/'):
      continue
    owner = [p for p in param_specs if path.endswith('/' + p)]
    if owner:  # a moment (mu, nu, trace) or the EMA of parameter `owner`
      assert spec == param_specs[owner[0]], path
      followers += 1
    else:  # counts, step, rng
      assert spec == P(), path
  moments = 2 if optimizer == 'adam' else 1
  assert followers == (moments + 1) * len(param_specs)  # + 1: the EMA


def test_describe_lists_every_leaf():
  params = abstract_state(tiny_model()).params
  shardings = sharding_lib.tree_shardings(params, abstract_mesh(tensor=4), tensor_rules=VIT_RULES)
  described = sharding_lib.describe(shardings)
  assert len(described) == len(jax.tree.leaves(params))
  assert described[f'{ATTN}/query/kernel'] == str(P(None, 'tensor', None))


# ---------------------------------------------------------------------------------------------
# Equivalence: 20 real train steps on 1 device and on data=8, data=2 x fsdp=4, data=2 x tensor=4
# and fsdp=2 x tensor=4.

MESHES = ('one', 'data8', 'fsdp', 'tensor', 'fsdp_tensor')


@pytest.fixture(scope='module')
def runs():
  """{mesh name: (arrays, info)} from one 8-CPU-device subprocess running every mesh in turn."""
  with tempfile.TemporaryDirectory() as out:
    results = worker.run_all([worker.worker_cmd(out, devices=8, meshes=MESHES)], timeout=420)
    worker.check_ok(results)
    yield {name: worker.load_run(out, name) for name in MESHES}


def test_reference_run_is_on_one_device_and_trains(runs):
  arrays, info = runs['one']
  assert info['mesh'] == {'data': 1, 'fsdp': 1, 'tensor': 1} and info['device_count'] == 8
  losses = arrays['losses']
  assert losses.shape == (20,) and np.all(np.isfinite(losses))
  assert losses[-3:].mean() < losses[:3].mean() - 0.2  # it learns: the comparison is not vacuous
  assert np.all(arrays['grad_norms'] > worker.OPTIM['grad_clip_norm'])  # clipping is active


@pytest.mark.parametrize('name', MESHES[1:])
def test_sharded_training_matches_one_device(runs, name):
  ref, _ = runs['one']
  arrays, info = runs[name]
  assert math.prod(info['mesh'].values()) == 8
  diff = worker.assert_equivalent(ref, arrays, name)
  print(f'{name}: {diff}')


def _assert_sharded(info, path, spec, shard_shape):
  """`path` (and its Adam moments) really lives in pieces: the spec and the per-device shape."""
  for prefix in ('params/', 'opt_state/1/mu/', 'opt_state/1/nu/'):
    leaf = info['leaves'][prefix + path]
    assert worker.spec_of(info, prefix + path) == spec, prefix + path
    assert leaf['shard_shape'] == list(shard_shape), prefix + path
    assert not leaf['is_fully_replicated'], prefix + path


def test_fsdp_run_really_shards_parameters_and_moments(runs):
  _, info = runs['fsdp']
  assert info['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  _assert_sharded(info, f'{ATTN}/query/kernel', ('fsdp',), (8, 4, 8))
  _assert_sharded(info, f'{MLP}/Dense_0/kernel', (None, 'fsdp'), (32, 16))
  _assert_sharded(info, f'{MLP}/Dense_0/bias', ('fsdp',), (16,))
  _assert_sharded(info, 'embedding/kernel', (None, None, None, 'fsdp'), (4, 4, 3, 8))
  assert info['leaves'][f'params/{ATTN}/query/bias']['is_fully_replicated']  # 32 < fsdp_min_size
  # Every leaf of at least fsdp_min_size elements with a dimension divisible by 4 holds a quarter.
  sharded = 0
  for path, leaf in info['leaves'].items():
    if math.prod(leaf['shape']) >= 64 and any(d % 4 == 0 for d in leaf['shape']):
      assert math.prod(leaf['shard_shape']) * 4 == math.prod(leaf['shape']), path
      sharded += 1
  assert sharded >= 3 * 17  # 17 such parameters, each with two Adam moments


def test_tensor_run_really_splits_heads_and_mlp(runs):
  _, info = runs['tensor']
  assert info['mesh'] == {'data': 2, 'fsdp': 1, 'tensor': 4}
  for name in ('query', 'key', 'value'):
    _assert_sharded(info, f'{ATTN}/{name}/kernel', (None, 'tensor'), (32, 1, 8))
  _assert_sharded(info, f'{ATTN}/query/bias', ('tensor',), (1, 8))
  _assert_sharded(info, f'{ATTN}/out/kernel', ('tensor',), (1, 8, 32))
  _assert_sharded(info, f'{MLP}/Dense_0/kernel', (None, 'tensor'), (32, 16))
  _assert_sharded(info, f'{MLP}/Dense_1/kernel', ('tensor',), (16, 32))
  for path in (f'{ATTN}/out/bias', f'{MLP}/Dense_1/bias', 'embedding/kernel', 'head/kernel'):
    assert info['leaves'][f'params/{path}']['is_fully_replicated'], path


def test_data_parallel_run_replicates_the_state(runs):
  _, info = runs['data8']
  assert info['mesh'] == {'data': 8, 'fsdp': 1, 'tensor': 1}
  assert all(leaf['is_fully_replicated'] for leaf in info['leaves'].values())


def test_fsdp_and_tensor_run_shards_one_parameter_over_both_axes(runs):
  _, info = runs['fsdp_tensor']
  assert info['mesh'] == {'data': 1, 'fsdp': 2, 'tensor': 4}
  _assert_sharded(info, f'{ATTN}/query/kernel', ('fsdp', 'tensor'), (16, 1, 8))
  _assert_sharded(info, f'{MLP}/Dense_0/kernel', ('fsdp', 'tensor'), (16, 16))
  _assert_sharded(info, f'{MLP}/Dense_1/kernel', ('tensor', 'fsdp'), (16, 16))
