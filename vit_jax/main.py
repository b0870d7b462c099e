"""Train or fine-tune a ViT.

    python -m vit_jax.main --config=RECIPE[:ARGS] --workdir=DIR [--config.key=value ...]

RECIPE: a packaged recipe by name (quickstart, quickstart_digits, fashion_mnist, pretrain, finetune,
...: vit_jax/configs, also configs/ in a checkout) or the path of a config file (configs/FILE.py).

Running the same command on the same workdir resumes from its latest checkpoint. A wrong key or value
is refused before anything heavy starts. With several hosts, set --config.distributed=True (or run
under a launcher that names a coordinator: TPU pods, SLURM) and start the same command on each.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import configs, runtime
from vit_jax.train import validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'training recipe: a name (quickstart, pretrain, ...) or a config file '
    '(configs/*.py), then [:args]', lock_config=True)
flags.DEFINE_string('workdir', None, 'output directory: checkpoints, metrics.jsonl, tensorboard/')
flags.mark_flags_as_required(['config', 'workdir'])


def _multiprocess(config) -> bool:
  """Whether this run is one process of several (asked for, or a coordinator in the environment)."""
  env = ('JAX_COORDINATOR_ADDRESS', 'COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
         'MEGASCALE_COORDINATOR_ADDRESS')
  return bool(config.distributed) or any(os.environ.get(k) for k in env)


def _maybe_initialize_distributed(config) -> None:
  """jax.distributed.initialize() when asked, or when the environment names a coordinator.

  JAX detects TPU pods, SLURM, Open MPI and Kubernetes by itself and reads JAX_COORDINATOR_ADDRESS,
  but not the process count and index; for a hand-started launch (one command per machine) they
  come from JAX_NUM_PROCESSES and JAX_PROCESS_ID.

  A lost process (killed, crashed, its machine gone) stops sending heartbeats; after
  `config.heartbeat_timeout` seconds the coordination service declares it dead and every other
  process aborts with "Terminating process because the JAX distributed service detected fatal
  errors ... tasks are unhealthy (stopped sending heartbeats)" instead of waiting in a collective
  forever. Running the same command on every process again resumes from the last checkpoint.
  """
  if _multiprocess(config):
    import jax  # pylint: disable=g-import-not-at-top
    kwargs = {}
    address = os.environ.get('JAX_COORDINATOR_ADDRESS') or os.environ.get('COORDINATOR_ADDRESS')
    if address:
      kwargs['coordinator_address'] = address
    for key, arg in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
      if os.environ.get(key):
        kwargs[arg] = int(os.environ[key])
    jax.distributed.initialize(**kwargs,
                               heartbeat_timeout_seconds=int(config.get('heartbeat_timeout', 100)),
                               shutdown_timeout_seconds=int(config.get('shutdown_timeout', 300)))


def main(argv) -> None:
  del argv
  config = FLAGS.config
  try:
    validate.validate(config)
  except validate.ConfigError as e:
    sys.exit(f'config error: {e}')
  # 0 (the default): as many CPU devices as pay for this model on this host (runtime.py)
  runtime.split_cpu(runtime.cpu_devices_for(config, _multiprocess(config)))
  runtime.use_compilation_cache(config.get('compilation_cache_dir') or '')
  _maybe_initialize_distributed(config)
  import jax  # pylint: disable=g-import-not-at-top
  try:  # the mesh and batch sizes against the devices, before anything is compiled or written
    validate.check_devices(config, jax.device_count(), jax.process_count())
  except validate.ConfigError as e:
    sys.exit(f'config error: {e}')
  from vit_jax.train import loop  # pylint: disable=g-import-not-at-top

  workdir = FLAGS.workdir
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  else:
    logging.set_verbosity(logging.WARNING)
  logging.info('devices: %s', jax.devices())
  from vit_jax.checkpoints import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    result = loop.train_and_evaluate(config, workdir)
  except (loop.NonFiniteLossError, loop.DataError, ckpt_lib.CheckpointError) as e:
    sys.exit(f'error: {e}')  # exit status 1, the reason as the last line
  except OSError as e:  # metrics.jsonl, TensorBoard: the same disk
    if not ckpt_lib.is_disk_full(e):
      raise
    sys.exit(f'error: no space left on device writing {e.filename or workdir}; the last complete '
             f'checkpoint in {workdir} is intact: free space there and run the same command again')
  if jax.process_index() == 0:
    summary = {'step': result.step, 'preempted': result.preempted, **result.eval,
               'train_loss': result.train_loss, 'seconds': round(result.seconds, 1),
               'skipped_images': result.skipped_images,
               'skipped_updates': result.skipped_updates}
    print('result: ' + json.dumps(summary), flush=True)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax and jax's internals; their warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    noisy = any(p in record.pathname for p in ('/orbax/', '/jax/_src/'))
    return record.levelno >= std_logging.WARNING or not noisy


def run() -> None:
  # grain's worker processes hand batches over in shared memory; at exit Python's resource tracker
  # calls the unconsumed ones "leaked" (and frees them). That warning is noise for a finished run.
  sys.warnoptions.append('ignore::UserWarning:multiprocessing.resource_tracker')
  try:  # a recipe's name (`--config=quickstart`) becomes its file, for absl and the check alike
    sys.argv[1:] = configs.resolve_argv(sys.argv[1:])
    validate.check_overrides(sys.argv[1:])
  except ValueError as e:  # validate.ConfigError among them
    sys.exit(f'config error: {e}')
  std_logging.getLogger('absl').setLevel(std_logging.INFO)
  std_logging.getLogger('absl').addFilter(_QuietLibraries())
  app.run(main)


if __name__ == '__main__':
  run()
