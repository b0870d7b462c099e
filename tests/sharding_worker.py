"""Trains a tiny ViT for a few steps on one or more meshes and saves what the sharding tests compare.

Run as a subprocess by tests/test_sharding.py and tests/test_multiprocess.py, because the number of
CPU devices (XLA_FLAGS) and `jax.distributed` must be fixed before JAX starts:

  python tests/sharding_worker.py --devices 8 --out DIR --meshes one,data8,fsdp,tensor,fsdp_tensor
  python tests/sharding_worker.py --devices 4 --out DIR --meshes data8 \
      --coordinator 127.0.0.1:PORT --num_processes 2 --process_id 0

Everything runs through the library's real path: `state.create_train_state` (sharded init),
`step.make_train_step` (jit with in/out shardings, donated state), `optim.make_optimizer` (clipping,
Adam, decoupled weight decay, warm-up + cosine) and `data.train_iterator(ArraySource)`, which builds
each global batch from this process's share with `jax.make_array_from_process_local_data`.

For each mesh NAME, process 0 writes
  DIR/NAME.npz   losses [steps], grad_norms [steps], the first global batch (batch0_image [B, H, W, C],
                 batch0_labels [B, K]) and every final parameter under 'params/PATH'
  DIR/NAME.json  per state leaf: global shape, PartitionSpec and the shape of one addressable shard
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Optional, Sequence

# Meshes by name: (mesh spec, number of devices it uses; None = all).
MESHES = {
    'one': ((('data', 1),), 1),
    'data8': ((('data', -1),), None),
    'fsdp': ((('data', 2), ('fsdp', 4)), None),
    'tensor': ((('data', 2), ('tensor', 4)), None),
    'fsdp_tensor': ((('fsdp', 2), ('tensor', 4)), None),
    # For the other families' tiny test models, whose head counts are small.
    'tensor2': ((('data', 4), ('tensor', 2)), None),
    'fsdp_tensor2': ((('fsdp', 4), ('tensor', 2)), None),
}
# Small enough for 2 CPU cores, large enough that every rule has something to shard:
# hidden 32 with 4 heads of 8 (tensor=4 splits heads), MLP 64, patch 4 on 16x16 -> 16 patches + cls.
MODEL = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
             classifier='token', head_zeroinit=False, dropout_rate=0.1)
OPTIM = dict(optimizer='adam', grad_clip_norm=1.0, b1=0.9, b2=0.999, weight_decay=0.1,
             wd_pattern='.*kernel')
# The other families' runs use SGD: their fused or differently named key biases (true gradient 0,
# see ZERO_GRADIENT) then move by lr x rounding noise instead of Adam's +-lr, so every parameter is
# compared. lr 0.05 makes one wrong shard update >= 5e-3, far above the tolerance.
FAMILY_OPTIM = dict(optimizer='sgd', grad_clip_norm=1.0, momentum=0.9, weight_decay=0.0)
FAMILY_LR = 0.05
IMAGE, CHANNELS, CLASSES, EXAMPLES = 16, 3, 10, 64

# Tolerances of the equivalence tests (see tests/test_sharding.py for why these values).
LOSS_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-5
# Parameters whose true gradient is exactly zero: softmax is invariant to adding q.b_k to every
# logit of a query, so the key bias never changes the output. Its float gradient is rounding noise
# (~1e-9) that Adam normalises into steps of +-lr in a direction set by that noise, so its value
# after training is noise in every run, sharded or not, and is not compared.
ZERO_GRADIENT = ('MultiHeadDotProductAttention_1/key/bias',)
WORKER = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(WORKER))


# ------------------------------------------------------------------------------------------------
# Helpers for the tests (standard library only at import, so importing this module is cheap).

def free_port() -> int:
  """A TCP port that was free a moment ago (bind to port 0 and let the OS choose)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# LLVM's optimisations off, as tests/conftest.py does in-process: a test's subprocess spends most
# of its time compiling (a tiny `vit_jax.main` run: 9.8 s -> 8.0 s). They change code generation,
# not the partitioned HLO, and every run being compared gets the same flags.
FAST_COMPILE = ('' if os.environ.get('VIT_JAX_TEST_OPTIMIZED') == '1' else
                ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true')


def worker_env(**extra: str) -> dict[str, str]:
  """The environment of a test's subprocess: this repository importable; XLA_FLAGS only as given in
  `extra` plus FAST_COMPILE (this process's own flags never leak in, so a subprocess has one CPU
  device unless `extra` says otherwise; the worker script sets its device count itself)."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  flags = (env.get('XLA_FLAGS', '') + FAST_COMPILE).strip()
  if flags:
    env['XLA_FLAGS'] = flags
  return env


def worker_cmd(out: str, *, devices: int, meshes: Sequence[str], steps: int = 20,
               coordinator: Optional[str] = None, num_processes: int = 1,
               process_id: int = 0, family: Optional[str] = None) -> list[str]:
  cmd = [sys.executable, WORKER, f'--out={out}', f'--devices={devices}',
         f'--meshes={",".join(meshes)}', f'--steps={steps}']
  if family:
    cmd.append(f'--family={family}')
  if coordinator:
    cmd += [f'--coordinator={coordinator}', f'--num_processes={num_processes}',
            f'--process_id={process_id}']
  return cmd


def run_all(cmds: Sequence[Sequence[str]], timeout: float, envs: Optional[Sequence[dict]] = None
            ) -> list[tuple[int, str]]:
  """Runs the commands at once; [(return code, stdout + stderr)]. Raises TimeoutError.

  When one process fails the others are killed at once (a peer of a dead process would otherwise
  wait for it until the distributed heartbeat gives up), and whatever happens (timeout, exception,
  KeyboardInterrupt) no process started here outlives the call. Output goes to temporary files, not
  pipes, so a chatty process cannot block on a full pipe.
  """
  procs, logs = [], []
  try:
    for i, cmd in enumerate(cmds):
      logs.append(tempfile.TemporaryFile(mode='w+'))
      procs.append(subprocess.Popen(
          list(cmd), cwd=ROOT, env=(envs[i] if envs else worker_env()), text=True,
          stdout=logs[-1], stderr=subprocess.STDOUT))
    deadline = time.time() + timeout
    while True:
      codes = [p.poll() for p in procs]
      if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
        break
      if time.time() > deadline:
        raise TimeoutError(f'{[p.args for p in procs]} did not finish in {timeout}s')
      time.sleep(0.2)
    results = []
    for p, log in zip(procs, logs):
      if p.poll() is None:  # a peer failed: this one is killed, and says so
        p.kill()
      rc = p.wait()
      log.seek(0)
      results.append((rc, log.read()))
    return results
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for log in logs:
      log.close()


def check_ok(results: Sequence[tuple[int, str]]) -> None:
  def excerpt(out: str) -> str:
    # A crash (a fatal signal) prints its cause far above the thread dump that ends the log.
    cause = [l for l in out.splitlines() if re.match(r'F\d{4} |Fatal|.*(Check failed|Error)', l)][:20]
    return '\n'.join(cause) + '\n...\n' + out[-3000:]
  bad = [(i, rc, excerpt(out)) for i, (rc, out) in enumerate(results) if rc != 0]
  if bad:
    raise AssertionError('\n'.join(f'process {i} exited {rc}:\n{out}' for i, rc, out in bad))


def load_run(out: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """(arrays of DIR/NAME.npz, DIR/NAME.json) as written by `run_mesh`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(out, f'{name}.npz')) as z:
    arrays = {k: z[k] for k in z.files}
  with open(os.path.join(out, f'{name}.json')) as f:
    return arrays, json.load(f)


def differences(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
  """Largest relative loss / grad-norm differences and largest parameter differences."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rel = lambda k: float(np.max(np.abs(other[k] - ref[k]) / np.abs(ref[k])))
  params = [k for k in ref if k.startswith('params/') and not k.endswith(ZERO_GRADIENT)]
  assert params and sorted(params) == sorted(
      k for k in other if k.startswith('params/') and not k.endswith(ZERO_GRADIENT))
  # Excess over the allowed |a - b| <= atol + rtol |b|: <= 0 passes.
  excess = max(float(np.max(np.abs(other[k] - ref[k]) - PARAM_ATOL - PARAM_RTOL * np.abs(ref[k])))
               for k in params)
  return {'loss_rel': rel('losses'), 'grad_norm_rel': rel('grad_norms'),
          'param_abs': max(float(np.max(np.abs(other[k] - ref[k]))) for k in params),
          'param_excess': excess}


def assert_equivalent(ref: dict[str, Any], other: dict[str, Any], what: str) -> dict[str, float]:
  """Same per-step losses and final parameters within the module's tolerances."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  # The same examples in the same rows, whichever devices and processes built the batch.
  np.testing.assert_array_equal(other['batch0_image'], ref['batch0_image'], err_msg=what)
  np.testing.assert_array_equal(other['batch0_labels'], ref['batch0_labels'], err_msg=what)
  np.testing.assert_allclose(other['losses'], ref['losses'], rtol=LOSS_RTOL, err_msg=what)
  np.testing.assert_allclose(other['grad_norms'], ref['grad_norms'], rtol=LOSS_RTOL, err_msg=what)
  for k in ref:
    if k.startswith('params/') and not k.endswith(ZERO_GRADIENT):
      np.testing.assert_allclose(other[k], ref[k], rtol=PARAM_RTOL, atol=PARAM_ATOL,
                                 err_msg=f'{what}: {k}')
  return differences(ref, other)


def spec_of(info: dict[str, Any], path: str) -> tuple:
  """The PartitionSpec of state leaf `path` as a tuple without trailing Nones."""
  spec = [tuple(e) if isinstance(e, list) else e for e in info['leaves'][path]['spec']]
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


# ------------------------------------------------------------------------------------------------
# The worker.


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--devices', type=int, default=8, help='CPU devices of this process')
  p.add_argument('--out', required=True)
  p.add_argument('--meshes', default=','.join(MESHES))
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--batch', type=int, default=16, help='global batch size')
  p.add_argument('--fsdp_min_size', type=int, default=64)
  p.add_argument('--coordinator', default=None, help='host:port; with it, jax.distributed')
  p.add_argument('--num_processes', type=int, default=1)
  p.add_argument('--process_id', type=int, default=0)
  p.add_argument('--family', default=None,
                 help="train this family's tiny test model (`Family.test_model`) instead of MODEL")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  # Before JAX initialises its backend: the CPU device count is read once, at start-up. FAST_COMPILE
  # halves the compile time, most of a run's cost on 2 cores.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={args.devices}' + FAST_COMPILE)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  if args.coordinator:
    # Cross-process collectives on CPU need an implementation; gloo over TCP is JAX's default in
    # 0.10 but named here so an older or differently configured JAX fails loudly, not silently.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
  assert jax.local_device_count() == args.devices, jax.local_devices()
  os.makedirs(args.out, exist_ok=True)
  try:
    for name in args.meshes.split(','):
      run_mesh(name, args)
  except BaseException:  # pylint: disable=broad-except
    # Leave at once: jax.distributed's shutdown barrier (and atexit) would wait for peers that are
    # themselves waiting for this process in a collective.
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  if args.coordinator:
    jax.distributed.shutdown()


def run_mesh(name: str, args: argparse.Namespace) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vit_jax import data  # pylint: disable=g-import-not-at-top
  from vit_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.families import registry  # pylint: disable=g-import-not-at-top
  from vit_jax.train import optim, state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  t0 = time.time()
  spec, n = MESHES[name]
  devices = jax.devices() if n is None else jax.devices()[:n]
  mesh = sharding_lib.make_mesh(spec, devices)
  family = registry.get_family(args.family or 'vit')
  if args.family:
    fields = dict(registry.get_model_config(family.test_model), head_zeroinit=False)
    image = family.test_image_size
  else:
    fields, image = MODEL, IMAGE
  model = family.create(fields, CLASSES)
  schedule = optim.make_schedule(FAMILY_LR if args.family else 1e-3, args.steps, warmup_steps=2,
                                 decay='cosine')
  tx = optim.make_optimizer(FAMILY_OPTIM if args.family else OPTIM, schedule)
  state, shardings = state_lib.create_train_state(
      model, tx, (1, image, image, CHANNELS), seed=0, mesh=mesh, fsdp_min_size=args.fsdp_min_size,
      tensor_rules=family.tensor_rules)
  train_step = step_lib.make_train_step(model, tx, schedule, mesh, shardings)

  # The same examples in every run: a function of a fixed seed, not of the process or the mesh.
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 256, (EXAMPLES, image, image, CHANNELS), np.uint8),
                            rng.integers(0, CLASSES, EXAMPLES), num_classes=CLASSES)
  batches = data.train_iterator(
      source, image_size=image, channels=CHANNELS, global_batch_size=args.batch, seed=0,
      augment='none', num_classes=CLASSES, sharding=sharding_lib.batch_sharding(mesh), prefetch=0)
  losses, grad_norms = [], []
  with batches:
    for i in range(args.steps):
      batch = next(batches)
      if i == 0:  # the global batch assembled from the processes' shares, in row order
        first = multihost_utils.process_allgather(batch, tiled=True)
      state, metrics = train_step(state, batch)
      # Metrics are replicated, so every process can read them.
      losses.append(float(metrics['loss']))
      grad_norms.append(float(metrics['grad_norm']))

  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  leaves = {}
  for path, leaf in flat:
    leaves[sharding_lib._path_str(path)] = {  # pylint: disable=protected-access
        'shape': list(leaf.shape),
        'spec': [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec],
        'shard_shape': list(leaf.addressable_shards[0].data.shape),
        'is_fully_replicated': bool(leaf.sharding.is_fully_replicated)}
  # Whole parameters on every process (an all-gather across processes), as NumPy.
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    arrays = {'params/' + sharding_lib._path_str(p): np.asarray(v)  # pylint: disable=protected-access
              for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(args.out, f'{name}.npz'), losses=np.array(losses),
             grad_norms=np.array(grad_norms), batch0_image=np.asarray(first['image']),
             batch0_labels=np.asarray(first['labels']), **arrays)
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
      json.dump({'mesh': dict(mesh.shape), 'process_count': jax.process_count(),
                 'device_count': jax.device_count(), 'seconds': time.time() - t0,
                 'leaves': leaves}, f, indent=1)
  print(f'{name}: {time.time() - t0:.1f}s losses {losses[0]:.4f} -> {losses[-1]:.4f}', flush=True)


if __name__ == '__main__':
  main()
