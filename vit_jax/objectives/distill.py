"""DeiT distillation (Touvron et al., 2021): a student with two heads learns the labels and a frozen
teacher's predictions on the same augmented batch.

    loss = (1 - alpha) CE(class head, labels) + alpha distill(distillation head, teacher)

hard: cross-entropy against the teacher's argmax; soft: T^2 KL at temperature T (metrics add
`cls_loss` and `distill_loss`). The teacher is any checkpoint this project reads, of any family
(`config.distill.teacher`); it runs in inference mode inside the jitted step, its parameters are a
frozen extra (placed on the mesh with its own family's rules, never updated or checkpointed), and
its input is the student's batch resized, converted to its channels and re-normalised as it was
trained (`teacher_input_fn`). Evaluation is classification's (the student averages its heads).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.models import tokens as tokens_lib
from vit_jax.objectives.base import Batch, model_params
from vit_jax.objectives.classify import Classify, loss_fn, smooth_labels

DISTILL_KINDS = ('hard', 'soft')


def distill_loss(student: jax.Array, teacher: jax.Array, kind: str = 'hard',
                 temperature: float = 3.0) -> jax.Array:
  """Mean over the batch of DeiT's distillation losses; student, teacher: logits [B, K].

  hard: softmax cross-entropy of the student against the teacher's argmax class.
  soft: T^2 KL(softmax(teacher / T) || softmax(student / T)), the paper's definition (Hinton's
    scaling; DeiT's code divides the summed KL by B*K instead of B, i.e. by K more).
  """
  student, teacher = student.astype(jnp.float32), teacher.astype(jnp.float32)
  if kind == 'hard':
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        student, jnp.argmax(teacher, axis=-1)))
  if kind == 'soft':
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature ** 2
  raise ValueError(f'distill.kind {kind!r} is not one of {DISTILL_KINDS}')


def teacher_input_fn(student_size: tuple[int, int], student_channels: int,
                     teacher_size: tuple[int, int], teacher_channels: int,
                     mean: Any, std: Any) -> Callable[[jax.Array], jax.Array]:
  """images [B, H, W, C] in [-1, 1] (the student's batch) -> the teacher's input [B, h, w, c]:
  resized (bilinear, antialiased) to its image size, grey repeated to 3 channels, and normalised
  as the teacher was trained ((x01 - mean) / std). Other channel changes are a ValueError."""
  if teacher_channels != student_channels and not (student_channels == 1 and teacher_channels == 3):
    raise ValueError(f'the teacher takes {teacher_channels}-channel images, the student '
                     f'{student_channels}: only grey to RGB (1 -> 3) is converted; train the '
                     f'student with --config.channels={teacher_channels} or use another teacher')
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  # This project trains on [-1, 1] (mean = std = 0.5); other teachers (timm's ImageNet) differ.
  renormalise = not (np.all(mean == 0.5) and np.all(std == 0.5))

  def fn(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    if tuple(student_size) != tuple(teacher_size):
      x = jax.image.resize(x, (x.shape[0], *teacher_size, x.shape[-1]), 'bilinear')
    if teacher_channels != student_channels:
      x = jnp.repeat(x, teacher_channels, axis=-1)
    if renormalise:
      x = ((x + 1.0) / 2.0 - mean) / std
    return x
  return fn


@dataclasses.dataclass(frozen=True)
class Distillation:
  """A frozen teacher for a DeiT student.

  model: the teacher's Flax module (any family; run with train=False). params: its parameters,
  already placed on the mesh (or ShapeDtypeStructs, for a plan); shardings: theirs. input_fn:
  student batch -> teacher input (`teacher_input_fn`). kind, alpha, temperature: `config.distill`.
  """
  model: Any
  params: Any
  shardings: Any
  input_fn: Callable[[jax.Array], jax.Array]
  kind: str = 'hard'
  alpha: float = 0.5
  temperature: float = 3.0


class Distill(Classify):
  """A DeiT student learning labels with its class head and a frozen teacher with the other."""
  name = 'distill'
  config_key = 'distill'
  needs = (tokens_lib.TWO_HEADS,)
  metrics = ('cls_loss', 'distill_loss')
  summary = 'DeiT distillation from a frozen teacher (hard or soft), plus the labels'

  def __init__(self, config, *, family=None, fields=None, num_classes=None,
               teacher: Optional[Distillation] = None, teacher_model: Optional[str] = None):
    """teacher: an already placed teacher (tests, a library caller); teacher_model: a registered
    architecture whose shapes stand in for the teacher (plans without a teacher checkpoint);
    otherwise `config.distill.teacher` is read when the extras are made."""
    super().__init__(config, family=family, fields=fields, num_classes=num_classes)
    self.teacher = teacher
    self.teacher_model = teacher_model

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {'teacher': None, 'kind': 'hard', 'temperature': 3.0, 'alpha': 0.5}

  @classmethod
  def check_config(cls, config, family) -> None:
    super().check_config(config, family)
    distill = config.get('distill') or {}
    kind, alpha, temperature = (distill.get(k, cls.defaults()[k])
                                for k in ('kind', 'alpha', 'temperature'))
    if kind not in DISTILL_KINDS:
      raise ValueError(f'distill.kind {kind!r}: one of {DISTILL_KINDS}')
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
      raise ValueError(f'distill.alpha must be in [0, 1], got {alpha!r}')
    if not (isinstance(temperature, (int, float)) and temperature > 0):
      raise ValueError(f'distill.temperature must be > 0, got {temperature!r}')
    teacher = distill.get('teacher')
    if not teacher:
      raise ValueError('objective distill needs a teacher: set --config.distill.teacher=PATH (a '
                       'run workdir, .npz, timm or Hugging Face checkpoint)')
    if not os.path.exists(teacher):
      raise ValueError(f'distill.teacher {teacher!r} does not exist (a run workdir, .npz, timm or '
                       'Hugging Face checkpoint)')

  # ---- the teacher ----
  def make_extras(self, mesh, *, platform=None, abstract=False):
    teacher = self.teacher
    if teacher is None:
      teacher = self._teacher(mesh, platform, abstract)
      self.teacher = teacher
    return {'teacher': teacher.params}, {'teacher': teacher.shardings}

  def _teacher(self, mesh, platform, abstract) -> Distillation:
    from vit_jax import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
    from vit_jax.families.base import Architecture  # pylint: disable=import-outside-toplevel
    from vit_jax.shapes import hw  # pylint: disable=import-outside-toplevel
    from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
    config = self.config
    if self.teacher_model:
      family = registry.family_of(self.teacher_model)
      fields = dict(registry.get_model_config(self.teacher_model))
      fields.pop('family', None)
      arch = Architecture(fields, self.num_classes, hw(config['image_size']), config['channels'],
                          family.name)
      model = arch.create_model()
      shape = (1, *arch.image_size, arch.channels)
      tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape))['params'])
      abstract = True
    else:
      from vit_jax.checkpoints import read_checkpoint  # pylint: disable=import-outside-toplevel
      path = config['distill']['teacher']
      ckpt = read_checkpoint(path)
      arch = ckpt.architecture or registry.detect(ckpt.params).infer(ckpt.params)
      if arch.num_classes != self.num_classes:
        raise ValueError(f'the teacher {path} predicts {arch.num_classes} classes, the student\'s '
                         f'dataset has {self.num_classes}: distil from a teacher of the same '
                         'classes')
      family = arch.get_family()
      tree = family.to_module_layout(params_lib.unflatten(ckpt.params), arch.model_config)
      logging.info('distillation (%s, alpha %g, T %g) from %s: %s %s at %s, %d channels',
                   self.distill_kind, self.alpha, self.temperature, path, family.name, arch.name,
                   arch.image_size, arch.channels)
    from vit_jax.train.build import compute_dtype  # pylint: disable=import-outside-toplevel
    model = arch.create_model(dtype=compute_dtype(config['dtype'], platform))
    shardings = sharding_lib.tree_shardings(tree, mesh, config['fsdp_min_size'],
                                            family.tensor_rules)
    if abstract:
      params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, shardings)
    else:
      params = jax.device_put(tree, shardings)
    input_fn = teacher_input_fn(hw(config['image_size']), config['channels'], arch.image_size,
                                arch.channels, arch.mean, arch.std)
    return Distillation(model, params, shardings, input_fn, self.distill_kind, self.alpha,
                        self.temperature)

  def frozen_macs(self, num_classes, image_size, channels) -> int:
    """The teacher's forward pass, counted at the student's image size (0 when its family cannot
    count its fields)."""
    if self.teacher is None:
      return 0
    from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
    family = registry.family_of_module(self.teacher.model)
    fields = {f: getattr(self.teacher.model, f) for f in family.field_names()
              if hasattr(self.teacher.model, f)}
    try:
      return int(family.forward_macs(fields, num_classes, image_size, channels))
    except Exception:  # pylint: disable=broad-except
      return 0

  @property
  def distill_kind(self) -> str:
    return self.teacher.kind if self.teacher is not None else self.block().get('kind', 'hard')

  @property
  def alpha(self) -> float:
    return float(self.teacher.alpha if self.teacher is not None else self.block().get('alpha', 0.5))

  @property
  def temperature(self) -> float:
    return float(self.teacher.temperature if self.teacher is not None
                 else self.block().get('temperature', 3.0))

  # ---- the loss ----
  def loss(self, model, params, extras, batch: Batch, rng):
    teacher = self.teacher
    images = batch['image']
    t_logits = teacher.model.apply({'params': extras['teacher']}, teacher.input_fn(images),
                                   train=False)
    t_logits = jax.lax.stop_gradient(t_logits)
    cls, dist = model.apply({'params': model_params(params, extras)}, images, train=True,
                            rngs={'dropout': rng}, return_both=True)
    base = loss_fn(cls, smooth_labels(batch['labels'], self.smoothing), self.loss_kind)
    kd = distill_loss(dist, t_logits, teacher.kind, teacher.temperature)
    total = (1.0 - teacher.alpha) * base + teacher.alpha * kd
    return total, {'cls_loss': base, 'distill_loss': kd}

  def meta(self) -> dict[str, Any]:
    block = {k: self.block().get(k, v) for k, v in self.defaults().items()}
    if block.get('teacher'):
      block['teacher'] = os.path.abspath(block['teacher'])
    return {'name': self.name, 'config': {**super().meta()['config'], **block}}

OBJECTIVE = Distill
