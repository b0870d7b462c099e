"""The base training config every recipe starts from. Each key is read by vit_jax.train.loop.

Keys a user sets most: model.name, dataset, data_dir, image_size, batch_size, total_steps,
warmup_steps, base_lr, eval_every, checkpoint_every, seed, mesh. Other `model.*` keys override the
registered architecture or its options (None keeps the registry's value; representation_size=0
means none); `vit_jax.families.registry` lists the models and their families.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from vit_jax import objectives
from vit_jax.families import registry


def model_config(name: str) -> ml_collections.ConfigDict:
  """`config.model`: a registered name plus an override slot for every field of every family.

  A slot left at None keeps the registered value; a set slot the model's family does not take is
  refused before anything starts (`registry.resolve`), naming the family's fields. Values are
  parsed as Python literals: `--config.model.depths=(2,2,6,2)`, `--config.model.act=gelu`.
  """
  slots = {field: config_dict.placeholder(object) for field in registry.override_fields()}
  return ml_collections.ConfigDict(dict(slots, name=name))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model_config('ViT-B_16')

  # Data (vit_jax.data). dataset: a TFDS name, 'fashion_mnist', 'digits', or a folder path.
  c.dataset = 'cifar10'
  c.data_dir = config_dict.placeholder(str)
  c.train_split = 'train'
  c.eval_split = 'test'
  c.held_out = 0.1            # folder datasets without train/test subfolders: evaluation fraction
  c.image_size = 224
  c.channels = 3              # the model's input channels; images are converted to this
  c.augment = 'inception_crop'  # preset of vit_jax.data.PRESETS
  c.randaugment = config_dict.placeholder(str)  # e.g. '2,15' (layers, magnitude)
  c.mixup = 0.0               # Mixup alpha (0: off)
  c.cutmix = 0.0              # CutMix alpha (0: off)
  c.eval_crop = False         # evaluation: resize-then-central-crop instead of resize
  c.workers = 0               # decode workers (0: in the main process)
  c.prefetch = 2              # batches prepared ahead on the host

  # Optimisation (vit_jax.train.optim).
  c.batch_size = 512          # global batch, over all processes and devices
  c.accum_steps = 1           # micro-batches per step (gradient accumulation)
  c.total_steps = 10_000
  c.warmup_steps = 500
  c.base_lr = 1e-3
  c.end_lr = 0.0
  c.lr_decay = 'cosine'       # cosine | linear | rsqrt | constant
  c.optimizer = 'adam'        # adam | sgd
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 0.1        # decoupled (AdamW), scaled by the learning rate
  c.wd_pattern = '.*kernel'   # parameter paths that decay
  c.momentum = 0.9            # sgd only
  c.mu_dtype = config_dict.placeholder(str)  # 'bfloat16': half-size first moment
  c.grad_clip_norm = 1.0
  # A step whose loss or gradients are NaN/inf: False stops the run naming the step (the last good
  # checkpoint is kept); True leaves parameters and optimizer state as they were for that step and
  # counts it in metrics.jsonl (`skipped_updates`).
  c.skip_nonfinite = False
  c.loss = 'softmax_xent'     # softmax_xent | sigmoid_xent
  c.label_smoothing = 0.0
  c.ema_decay = 0.0           # parameter EMA (0: off); evaluation then uses the EMA
  c.dtype = 'auto'            # computation dtype: auto (bfloat16 on accelerators, float32 on CPU)
  c.seed = 0

  # Transfer (vit_jax.checkpoints.pretrained).
  c.pretrained = config_dict.placeholder(str)   # .npz, timm/HF checkpoint, or orbax workdir
  c.keep_pre_logits = config_dict.placeholder(bool)
  # Resampling of resolution-dependent tables: bilinear (scipy zoom order 1) | bicubic (antialiased)
  # | linear (half-pixel, no antialiasing: FlexiViT's); None: the family's default (ViT position
  # embeddings bilinear, as Google; Swin bicubic). A ViT's patch kernel moved to another
  # model.patch_size is PI-resized (FlexiViT) with bicubic here when bicubic, else linear.
  c.posemb_resize = config_dict.placeholder(str)

  # The training objective (vit_jax.objectives): how the model learns. classify (labels; its keys
  # are `loss` and `label_smoothing` above), distill (DeiT; `distill.*`), mpp (masked patch
  # prediction; `mpp.*`), mae (masked autoencoder; `mae.*`), prompt (visual prompt tuning of a
  # frozen `pretrained` backbone; `prompt.*`). Each objective owns the block of its name (its keys
  # are documented in its module, vit_jax/objectives/<name>.py); a classify config with
  # `distill.teacher` set distils, as before objectives existed.
  c.objective = ml_collections.ConfigDict({'name': 'classify'})
  for key, defaults in objectives.config_blocks().items():
    c[key] = ml_collections.ConfigDict(
        {k: config_dict.placeholder(str) if v is None else v for k, v in defaults.items()})

  # Few-shot evaluation during training (vit_jax.eval.fewshot): pre-logits features of `shots`
  # training images per class (seeds 0..seeds-1), ridge regression (big_vision's fewshot_lsr) or
  # k-NN, accuracy on the test split, logged as fewshot/<dataset>/<k>shot (mean over seeds).
  # Reads the parameters only: the training trajectory is bitwise the same with or without it.
  c.fewshot = ml_collections.ConfigDict()
  c.fewshot.datasets = ()       # e.g. ('digits', 'fashion_mnist'); empty: off
  c.fewshot.shots = (1, 5, 10, 25)
  c.fewshot.seeds = 3
  c.fewshot.method = 'ridge'    # ridge | knn
  c.fewshot.l2_reg = 2.0 ** 10  # ridge strength
  c.fewshot.k = 20              # knn neighbours
  c.fewshot.every = 0           # steps between few-shot evaluations; 0: with every evaluation
  # None: the run's data_dir for the run's own dataset, the source's default for the others.
  c.fewshot.data_dir = config_dict.placeholder(str)

  # Parallelism (vit_jax.sharding). Axis sizes multiply to the device count; -1 takes the rest.
  c.mesh = (('data', -1), ('fsdp', 1), ('tensor', 1))
  c.fsdp_min_size = 2 ** 14   # parameters with fewer elements stay replicated under FSDP
  c.distributed = False       # call jax.distributed.initialize() (auto when a coordinator is set)
  # jax.distributed, in seconds: a process silent (no heartbeat) this long is declared lost and the
  # others stop with an error rather than wait in a collective; a finishing process waits up to
  # shutdown_timeout for the others.
  c.heartbeat_timeout = 100
  c.shutdown_timeout = 300
  # Split the host CPU into this many JAX devices, data parallel; only the CPU backend is affected.
  # 0: chosen from the model's shapes and the host's cores (vit_jax/runtime.py: auto_cpu_devices):
  # as many devices as cores where attention's many small products are a large part of the step
  # (the Fashion-MNIST ViT, 49 tokens: 2 on 2 cores), else one (ViT-Ti/S at 224, the quickstart's 16
  # tokens). 1: never split. The README's speed section has the figures.
  c.cpu_devices = 0
  # XLA's persistent compilation cache: a directory (local, or gs://... on Cloud TPU) that keeps the
  # compiled train and eval steps, so that the same job started again (after a preemption, to
  # resume, or a second run of the same config) loads them instead of compiling them. '': JAX's own
  # setting (the JAX_COMPILATION_CACHE_DIR variable; off when unset). Programs that compile in under
  # a second are not kept (JAX's default).
  c.compilation_cache_dir = ''

  # Evaluation, logging, checkpoints.
  c.eval_every = 1000
  c.eval_batch_size = 0       # 0: same as batch_size
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_last = 3
  c.keep_every = 0            # also keep every N-th step (0: none)
  c.keep_best = True          # also keep the best checkpoint by eval_top1
  c.async_checkpoints = True
  c.progress = True           # console progress bar (process 0)
  return c


def parse_args(arg: str | None, **defaults) -> dict:
  """'model=ViT-B_16,dataset=cifar10' -> dict over `defaults` (unknown keys are an error)."""
  out = dict(defaults)
  for part in filter(None, (arg or '').split(',')):
    if '=' not in part:
      raise ValueError(f'config argument {part!r} is not key=value; valid keys: {sorted(defaults)}')
    k, v = part.split('=', 1)
    if k not in defaults:
      raise ValueError(f'unknown config argument {k!r}; valid keys: {sorted(defaults)}')
    out[k] = v
  return out
