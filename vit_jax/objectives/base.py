"""What a training objective is: `Objective`, subclassed once per way of training.

The trainer (`vit_jax.train`) builds a model of a family and asks the run's objective for
everything that depends on how it learns: the batch it needs, the parameters it adds and which
parameters train, any frozen state, the loss, the evaluation and the metric that keeps the best
checkpoint. The trainer names no objective; an objective names no family (it talks to models
through `vit_jax.models.tokens` and to families through their declared capabilities).

Parameters. The training state's `params` hold the model's *trainable* parameters (its own tree,
the family's file format) plus the objective's own parameters under the reserved top-level key
`objective` (a mask embedding, a decoder, prompts). Parameters the objective freezes never enter
the training state: they are frozen *extras*, placed on the mesh with the same rules, passed to
the jitted step as a separate argument, never updated, never given optimizer state and never
checkpointed (a checkpoint records where they came from instead). Extras also carry other frozen
state (a distillation teacher). `model_params(params, extras)` reassembles what the model takes.

A checkpoint written under one objective and read under another (`pretrained=`): the `objective`
subtree is the writer's alone; `vit_jax.checkpoints` drops it and names it in the load report, and
the reader's own objective parameters start from their initialisation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.families.base import Architecture
from vit_jax.shapes import hw

OBJECTIVE_KEY = 'objective'  # the params subtree an objective owns; no family uses this name
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """One batch entry: per-example shape (after the batch axis) and dtype."""
  shape: tuple[int, ...]
  dtype: Any


def merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
  """Nested dicts merged; a leaf in both is an error (the trainable and frozen parts of one model
  never overlap)."""
  out = dict(base)
  for k, v in top.items():
    if k in out and isinstance(out[k], Mapping) and isinstance(v, Mapping):
      out[k] = merge(out[k], v)
    elif k in out:
      raise ValueError(f'parameter {k!r} is both trainable and frozen')
    else:
      out[k] = v
  return out


def split(tree: Mapping[str, Any], keep: Callable[[str], bool], prefix: str = ''
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(leaves whose '/'-joined path `keep` accepts, the rest), as two nested dicts without empty
  branches."""
  yes: dict[str, Any] = {}
  no: dict[str, Any] = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, Mapping):
      a, b = split(v, keep, path + '/')
      if a:
        yes[k] = a
      if b:
        no[k] = b
    elif keep(path):
      yes[k] = v
    else:
      no[k] = v
  return yes, no


def model_params(params: Mapping[str, Any], extras: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """The model's whole parameter tree: the trainable part of the state's params (without the
  objective's own subtree) merged with the frozen extras."""
  own = {k: v for k, v in params.items() if k != OBJECTIVE_KEY}
  frozen = (extras or {}).get('frozen')
  return merge(frozen, own) if frozen else own


def own_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The objective's own parameters ({} when it has none)."""
  return dict(params.get(OBJECTIVE_KEY, {}))


class Objective:
  """One way to train; subclass it once per objective and list it in `registry.py`.

  Class attributes a subclass sets:
    name: `config.objective.name`.
    config_key: the config block the objective owns (`config.<config_key>`, keys from `defaults()`),
      or None.
    needs: family capabilities the model must have (`vit_jax.models.tokens`); a family that lacks
      one is refused before anything compiles, with the family's reason.
    uses_labels: whether training batches carry labels (evaluation batches too, unless
      `eval_uses_labels` says otherwise).
    best_metric, best_mode: the evaluation metric that keeps the best checkpoint, 'max' or 'min'.
    tensor_rules: tensor-parallel rules (path regex, spec) for the objective's own parameters
      (paths start with 'objective/'); the family's rules apply to them too.
    metrics: the names of the float32 scalars `loss` returns besides the loss.
    exportable: None, or why a model trained this way cannot be written for timm / Hugging Face.
    summary: one line for the README's table and `--help`.

  An instance is bound to one run: the config (its own block and the shared keys it reads), the
  family and fields of the model, and the dataset's class count.
  """
  name: ClassVar[str] = ''
  config_key: ClassVar[Optional[str]] = None
  needs: ClassVar[tuple[str, ...]] = ()
  uses_labels: ClassVar[bool] = True
  eval_uses_labels: ClassVar[Optional[bool]] = None
  best_metric: ClassVar[str] = 'eval_top1'
  best_mode: ClassVar[str] = 'max'
  tensor_rules: ClassVar[tuple] = ()
  metrics: ClassVar[tuple[str, ...]] = ()
  exportable: ClassVar[Optional[str]] = None
  summary: ClassVar[str] = ''

  def __init__(self, config: Mapping[str, Any], *, family: Any = None,
               fields: Optional[Mapping[str, Any]] = None, num_classes: Optional[int] = None):
    self.config = config
    self.family = family
    self.fields = dict(fields or {})
    self.num_classes = num_classes

  # ---- configuration ----
  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """The keys and defaults of `config.<config_key>` (empty when the objective has no block)."""
    return {}

  @classmethod
  def check_config(cls, config: Mapping[str, Any], family: Any) -> None:
    """Raises ValueError naming the key when the objective's block (or a key it reads) is wrong,
    or when the family cannot serve it."""
    if family is not None:
      why = family.missing_capability(cls.needs)
      if why:
        raise ValueError(f'objective {cls.name!r} cannot train a {family.name} model: {why}')

  def block(self) -> Mapping[str, Any]:
    """This objective's own config block."""
    return self.config[self.config_key] if self.config_key else {}

  # ---- the model ----
  def head_classes(self) -> Optional[int]:
    """The width of the model's classifier head (None: the model is built without one)."""
    return self.num_classes

  # ---- batches ----
  def batch_spec(self, image_shape: Sequence[int]) -> dict[str, ArraySpec]:
    """What a training batch holds (the loader produces exactly these keys)."""
    spec = {'image': ArraySpec(tuple(image_shape), jnp.float32)}
    if self.uses_labels:
      spec['labels'] = ArraySpec((int(self.num_classes),), jnp.float32)
    return spec

  def eval_labels(self) -> bool:
    return self.uses_labels if self.eval_uses_labels is None else self.eval_uses_labels

  # ---- parameters ----
  def init_own(self, model: Any, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
    """The objective's own parameters, freshly initialised ({}: none)."""
    del model, rng, input_shape
    return {}

  def trainable(self, path: str) -> bool:
    """Whether the model parameter at '/'-joined `path` (module layout) trains."""
    del path
    return True

  def freezes(self) -> bool:
    """Whether any model parameter is frozen (then it lives in the extras, not the state)."""
    return False

  def initial_params(self, model_tree: Mapping[str, Any], model: Any, rng: jax.Array,
                     input_shape: Sequence[int]) -> dict[str, Any]:
    """The training state's params from the model's (fresh or pretrained) tree: its trainable
    part plus the objective's own parameters."""
    params, _ = split(model_tree, self.trainable) if self.freezes() else (dict(model_tree), {})
    own = self.init_own(model, rng, input_shape)
    return {**params, OBJECTIVE_KEY: own} if own else params

  def frozen_params(self, model_tree: Mapping[str, Any]) -> dict[str, Any]:
    """The frozen part of the model's tree ({} when nothing is frozen)."""
    if not self.freezes():
      return {}
    return split(model_tree, self.trainable)[1]

  # ---- frozen state besides parameters ----
  def make_extras(self, mesh: Any, *, platform: Optional[str] = None, abstract: bool = False
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(extras, their shardings) that are not model parameters (a teacher); ({}, {}) by default.
    `abstract`: ShapeDtypeStructs only (a plan)."""
    del mesh, platform, abstract
    return {}, {}

  # ---- training ----
  def loss(self, model: Any, params: Mapping[str, Any], extras: Mapping[str, Any], batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss over the batch, extra metrics as float32 scalars)."""
    raise NotImplementedError

  # ---- evaluation ----
  def eval_sums(self, model: Any, params: Mapping[str, Any], extras: Mapping[str, Any],
                batch: Batch, rng: jax.Array) -> dict[str, jax.Array]:
    """Sums over the unmasked examples of one evaluation batch (`batch['mask']`), with 'count'."""
    raise NotImplementedError

  def eval_summary(self, totals: Mapping[str, float]) -> dict[str, float]:
    """The metrics logged as `eval_*` from the summed totals."""
    n = max(float(totals['count']), 1.0)
    out = {f'eval_{k}': float(v) / n for k, v in totals.items() if k != 'count'}
    out['eval_count'] = int(totals['count'])
    return out

  def visualize(self, model: Any, params: Mapping[str, Any], images: jax.Array,
                rng: jax.Array) -> Optional[dict[str, Any]]:
    """What `python -m vit_jax.inspect` shows of a model trained this way, on images [B, H, W, C]
    (normalised as the model's input): None, or {'title', 'caption', 'columns': [(column title,
    float32 [B, H, W, C] pixels in [0, 1])]}. `params` are the state's (model and own)."""
    del model, params, images, rng
    return None

  def analytic_macs(self, model_macs: int) -> int:
    """Multiply-accumulates of one training example's forward pass, given the model's
    (`Family.forward_macs`) on the whole image: what a plan's analytic FLOPs count."""
    return model_macs

  def frozen_macs(self, num_classes: Optional[int], image_size: Any, channels: int) -> int:
    """Multiply-accumulates of the frozen extras' forward pass (a teacher model) per training
    example, after `make_extras`; a plan counts them once (no backward). 0: none."""
    del num_classes, image_size, channels
    return 0

  # ---- checkpoints and inference ----
  def meta(self) -> dict[str, Any]:
    """What a checkpoint records about how it was trained (JSON)."""
    block = {k: _jsonable(v) for k, v in dict(self.block()).items()}
    return {'name': self.name, 'config': block}

  @classmethod
  def inference_tokens(cls, meta: Mapping[str, Any], own: Mapping[str, Any]) -> Any:
    """The `TokenInputs` a model trained this way needs at inference (None: none); `own` is the
    checkpoint's objective subtree."""
    del meta, own
    return None

  @classmethod
  def complete(cls, meta: Mapping[str, Any], flat: dict[str, np.ndarray], arch: Any,
               run_config: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """A checkpoint's model parameters (flat, file layout) made whole, with notes. A run whose
    objective froze part of the model saved only the trained part and recorded the frozen part's
    source (`meta['frozen_from']`: path and sha256): it is read and adapted again as the run did,
    and must still hold the same parameters."""
    source = meta.get('frozen_from')
    if not source:
      return flat, []
    frozen = frozen_from_source(source, arch, run_config, exclude=set(flat))
    return {**frozen, **flat}, [f'frozen parameters ({len(frozen)} arrays) read from '
                                f'{source["path"]} (sha256 checked)']

  @classmethod
  def describe(cls, meta: Mapping[str, Any]) -> list[str]:
    """Lines for `python -m vit_jax.checkpoints info`."""
    config = meta.get('config') or {}
    settings = ', '.join(f'{k}={v}' for k, v in sorted(config.items()))
    return [f'objective: {cls.name}' + (f' ({settings})' if settings else '')]


def patch_layout(family: Any, fields: Mapping[str, Any], config: Mapping[str, Any]
                 ) -> tuple[int, tuple[int, int], tuple[int, int]]:
  """(prefix tokens, patch grid, input pixels per patch) of the run's model."""
  arch = Architecture(dict(fields), None, hw(config['image_size']), config['channels'],
                      family.name)
  return family.token_layout(arch)


def token_width(model: Any, input_shape: Sequence[int]) -> int:
  """The width D of the model's tokens (from shapes only)."""
  x = jnp.zeros((1, *input_shape[1:]), jnp.float32)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  _, aux = jax.eval_shape(lambda v: model.apply(v, x, return_aux=True, return_weights=False), init)
  return int(aux['patch_tokens'].shape[-1])


def from_checkpoint(meta: Mapping[str, Any], arch: Any) -> 'Objective':
  """The objective instance of a checkpoint: its class from `meta['objective']`, bound to the run's
  config (`meta['config']`) and the checkpoint's architecture."""
  from vit_jax.objectives import registry  # pylint: disable=import-outside-toplevel
  cls, objective = registry.of_meta(meta)
  config = dict(meta.get('config') or {})
  if cls.config_key:
    config[cls.config_key] = {**cls.defaults(), **(objective.get('config') or {})}
  config.setdefault('image_size', list(arch.image_size))
  config.setdefault('channels', arch.channels)
  return cls(config, family=arch.get_family(), fields=arch.model_config,
             num_classes=arch.num_classes)


def to_unit(images: jax.Array, mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,)
            ) -> np.ndarray:
  """Model inputs (x01 - mean) / std -> float32 pixels in [0, 1]."""
  x = np.asarray(images, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(x, 0.0, 1.0)


def unpatchify(patches: np.ndarray, grid: tuple[int, int], patch_hw: tuple[int, int],
               channels: int) -> np.ndarray:
  """[B, gh * gw, ph * pw * C] -> [B, gh * ph, gw * pw, C] (the inverse of `mpp.patchify`)."""
  b = patches.shape[0]
  (gh, gw), (ph, pw) = grid, patch_hw
  x = np.asarray(patches).reshape(b, gh, gw, ph, pw, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * ph, gw * pw, channels)


def frozen_digest(flat: Mapping[str, Any]) -> str:
  """sha256 of frozen parameters (flat, file layout): what a run records of its frozen part."""
  from vit_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  return manager.params_digest(params_lib.unflatten(dict(flat)))


def frozen_from_source(source: Mapping[str, Any], arch: Any, run_config: Mapping[str, Any],
                       exclude: set[str]) -> dict[str, np.ndarray]:
  """The frozen parameters (flat, file layout) a run recorded as {'path', 'sha256'}: the file read
  and adapted to `arch` as training did (`run_config`'s keep_pre_logits and posemb_resize), minus
  the `exclude` paths (the trained ones); ValueError when the file no longer gives that sha256."""
  from vit_jax.checkpoints import pretrained  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  model = arch.create_model()
  fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *arch.image_size, arch.channels)))
  tree, _ = pretrained.load_pretrained(
      source['path'], fresh['params'], model=model, image_size=arch.image_size,
      keep_pre_logits=run_config.get('keep_pre_logits'),
      posemb_resize=run_config.get('posemb_resize'), log=None)
  flat = params_lib.flatten_numpy(arch.get_family().to_file_layout(tree))
  frozen = {k: v for k, v in flat.items() if k not in exclude}
  digest = frozen_digest(frozen)
  if digest != source.get('sha256'):
    raise ValueError(f'the frozen parameters of this checkpoint come from {source["path"]} (sha256 '
                     f'{source.get("sha256")}), but that file now gives sha256 {digest}: restore '
                     'the file the run was trained on')
  return frozen


def _jsonable(v: Any) -> Any:
  if isinstance(v, tuple):
    return list(v)
  if hasattr(v, 'to_dict'):
    return v.to_dict()
  return v
