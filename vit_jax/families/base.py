"""What a model family is: `Family` (the descriptor) and `Architecture` (one model, fully described).

A family is three files:
  vit_jax/models/<family>.py            its pure Flax modules (parameter names are a file format);
  vit_jax/families/<family>.py          its descriptor, a subclass of `Family` (this module);
  vit_jax/families/<family>_interop.py  its interop, a subclass of `interop.Interop`: the timm,
                                        Hugging Face and Google `.npz` key maps and configs.
plus its entry in `registry._FAMILY_MODULES`, which pairs the descriptor with its interop. The
interop module imports the descriptor, never the reverse (tests/test_layering.py): the descriptor is
what training, planning and inspection need, and it stays readable as architectures are added.

The descriptor owns what knows the family's parameter names inside this project, as declarations
(class attributes: names and sizes, head and optional prefixes, tensor-parallel rules, the tiny test
model, ...) and hooks grouped by concern:
  capabilities    missing_capability (what training objectives may ask of the module)
  building        module_class, field_names, normalize_fields, create, validate
  counting        forward_macs, summary_rows
  reading trees   matches, infer, to_file_layout, to_module_layout
  transfer        adapt, check_transfer (pretrained loading, checkpoints/pretrained.py)
  inspection      token_layout, prefix_names, attention_fn, position_table, patch_filters
                  (vit_jax.eval)
The trainer, `summary`, `predict`, `convert`, `sharding` and pretrained loading ask the family
(through `registry`) and never name a parameter themselves.

Flat parameter dicts ("flat") map '/'-joined paths of the family's *file layout* (the unscanned tree
that Google's or this project's checkpoints hold) to numpy arrays.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax.shapes import hw

Flat = dict[str, np.ndarray]
Rule = tuple[str, tuple]

# The two GELUs in use: Google's checkpoints and Flax's default use the tanh approximation; timm,
# Hugging Face and PyTorch's nn.GELU the exact (erf) form. They differ by up to ~3e-4 in logits.
ACTIVATIONS = ('gelu', 'gelu_tanh')
# Pixels scaled to [0, 1] then normalised as (x - mean) / std. This project trains on [-1, 1].
SIGNED_UNIT = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass
class Architecture:
  """One model, fully described: enough to build it, feed it and name its outputs.

  family: a registered family name ('vit', 'deit', 'hybrid', 'mixer', 'swin', 'pvt').
  model_config: the family module's fields (and 'name' when it is a registered model).
  num_classes: head width, or None for a headless feature extractor.
  image_size: (height, width) pixels the model was built or trained for.
  channels: input channels.
  mean, std: per-channel input normalisation applied to pixels in [0, 1] ((x - mean) / std), as the
    checkpoint declares (timm pretrained_cfg, HF preprocessor_config, 0.5/0.5 for Google and here).
  """
  model_config: dict[str, Any]
  num_classes: Optional[int]
  image_size: tuple[int, int]
  channels: int = 3
  family: str = 'vit'
  mean: Optional[tuple[float, ...]] = None
  std: Optional[tuple[float, ...]] = None

  def __post_init__(self):
    self.image_size = hw(self.image_size)
    c = self.channels
    if self.mean is None:
      self.mean = SIGNED_UNIT[0][:1] * c if c != 3 else SIGNED_UNIT[0]
    if self.std is None:
      self.std = SIGNED_UNIT[1][:1] * c if c != 3 else SIGNED_UNIT[1]
    self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)

  @property
  def name(self) -> str:
    return str(self.model_config.get('name') or self.family)

  def get_family(self) -> 'Family':
    from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
    return registry.get_family(self.family)

  def create_model(self, **overrides: Any):
    """The Flax module of this architecture (overrides: module options such as dtype)."""
    return self.get_family().create(self.model_config, self.num_classes, **overrides)

  def to_meta(self) -> dict[str, Any]:
    """The one metadata schema (orbax runs, converted files); `from_meta` inverts it."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_config.items()}
    return {'family': self.family, 'model_config': cfg, 'num_classes': self.num_classes,
            'image_size': list(self.image_size), 'channels': self.channels,
            'mean': list(self.mean), 'std': list(self.std)}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> 'Architecture':
    """Reads `to_meta()` output; files written before families existed are ViTs."""
    family = meta.get('family', 'vit')
    from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
    cfg = registry.get_family(family).normalize_fields(dict(meta['model_config']))
    return cls(cfg, meta.get('num_classes'), hw(meta['image_size']), int(meta.get('channels', 3)),
               family, meta.get('mean'), meta.get('std'))


class Family:
  """The descriptor of one model family; subclass it once per family and register an instance.

  Declarations (class attributes a subclass sets):
    name: the family's registry name.
    models: registered model name -> its fields (what `registry.get_model_config` returns).
    layout_fields: fields that change the parameter tree's layout without changing the maths (scan).
    head_prefixes: parameter path prefixes of the classifier head(s): re-created when the class count
      changes.
    optional_prefixes: paths or prefixes that one side of a transfer may lack (pre-logits, a class
      token, an attention-pooling head): taken from the initialisation or dropped, and reported.
    stem_kernel: path of the input convolution kernel [kh, kw, C, D] (grey-scale adaptation).
    pre_logits_prefix: prefix of an optional pre-logits layer (`keep_pre_logits` decides).
    default_resize: how `adapt` resamples resolution-dependent tables unless the config says.
    tensor_rules: (path regex, PartitionSpec entries of the unscanned parameter) for Megatron-style
      tensor parallelism; an entry of () marks a parameter deliberately replicated.
    inspect_note: why the inspection hooks are not defined for this family (the default hooks raise
      it).
    test_model, test_image_size: a registered tiny model and its input size: what the
      registry-parametrised tests (tests/test_families.py) build, train, save and export.
    capabilities, lacks: what the module offers training objectives (`vit_jax.models.tokens`
      names), and why it lacks the others (`missing_capability`).
    intermediate_unit, call_time_size: the backbone API (`vit_jax.models.backbone`): what
      `model.apply(..., intermediates=(i, ...))` indexes ('blocks', 'stages'; '' if not offered),
      and how the module meets an image size other than the one it was built for: 'any' (nothing
      in its parameters depends on the size), 'dynamic_img_size' (its field of that name resamples
      the size-dependent tables inside the jitted call), 'fixed' (refused; the reason is
      `lacks['dynamic_img_size']`).
  What the family reads and writes in other libraries' formats (timm architecture prefixes, Hugging
  Face model types, Google's npz) is declared by its interop (`interop.Interop`), not here.
  """
  name: str = ''
  models: Mapping[str, Mapping[str, Any]] = {}
  layout_fields: tuple[str, ...] = ()
  head_prefixes: tuple[str, ...] = ('head/',)
  optional_prefixes: tuple[str, ...] = ()
  stem_kernel: Optional[str] = None
  pre_logits_prefix: Optional[str] = None
  default_resize: str = 'bilinear'
  tensor_rules: tuple[Rule, ...] = ()
  inspect_note: str = 'it defines no inspection hooks'
  test_model: Optional[str] = None
  test_image_size: int = 16
  # What the module accepts from a training objective and gives back (`vit_jax.models.tokens`:
  # TOKEN_MASK, KEEP, PROMPTS, TOKEN_MAP, TWO_HEADS); an objective that needs a capability the
  # family lacks is refused before anything compiles, with the family's reason from `lacks`.
  capabilities: tuple[str, ...] = ()
  lacks: Mapping[str, str] = {}
  intermediate_unit: str = ''
  call_time_size: str = 'fixed'

  # ---- capabilities ----
  def missing_capability(self, needs: Sequence[str]) -> Optional[str]:
    """Why this family cannot serve an objective that needs `needs` (None: it can)."""
    for capability in needs:
      if capability not in self.capabilities:
        why = self.lacks.get(capability, f'its module does not provide {capability!r}')
        return f'the {self.name} family cannot serve it: {why}'
    return None

  # ---- building ----
  def module_class(self) -> type:
    raise NotImplementedError

  def field_names(self) -> tuple[str, ...]:
    """Every field the module takes besides num_classes (architecture and options)."""
    cls = self.module_class()
    return tuple(sorted(set(cls.__dataclass_fields__) - {'parent', 'name', 'num_classes'}))

  def normalize_fields(self, fields: dict[str, Any]) -> dict[str, Any]:
    """JSON round trips turn tuples into lists; the module wants tuples back."""
    return {k: (tuple(tuple(x) if isinstance(x, list) else x for x in v)
                if isinstance(v, list) else v) for k, v in fields.items()}

  def create(self, fields: Mapping[str, Any], num_classes: Optional[int], **overrides: Any):
    """The family's module from registry fields plus overrides; unknown fields are a ValueError
    naming them and the valid ones."""
    merged = {k: v for k, v in dict(fields).items() if k not in ('name', 'family')}
    merged.update(overrides)
    merged = self.normalize_fields(merged)
    valid = set(self.field_names())
    unknown = sorted(set(merged) - valid)
    if unknown:
      raise ValueError(f'unknown field(s) {unknown} for the {self.name} family; valid fields: '
                       f'{sorted(valid)}')
    return self.module_class()(num_classes=num_classes, **merged)

  def validate(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> None:
    """Raises ValueError naming the field when the fields cannot work at this image size."""

  # ---- counting ----
  def forward_macs(self, fields: Mapping[str, Any], num_classes: Optional[int],
                   image_size: tuple[int, int], channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass of one image (matmuls and convolutions only)."""
    raise NotImplementedError

  def summary_rows(self, fields: Mapping[str, Any], image_size: tuple[int, int]) -> list[str]:
    """Extra lines for `python -m vit_jax.summary` (per-stage tokens, widths, windows)."""
    del fields, image_size
    return []

  # ---- reading parameter trees ----
  def matches(self, flat: Mapping[str, Any]) -> bool:
    """Whether a flat dict (file layout) is a parameter set of this family."""
    raise NotImplementedError

  def infer(self, flat: Mapping[str, Any], *, model_config: Optional[Mapping[str, Any]] = None,
            image_size: Optional[Any] = None) -> Architecture:
    """The architecture a flat dict describes; size fields that disagree with `model_config` are a
    ValueError naming the field and both values."""
    raise NotImplementedError

  def to_file_layout(self, tree: Any) -> Any:
    """A module params tree -> the file layout (e.g. scanned blocks unstacked)."""
    return tree

  def to_module_layout(self, tree: Any, fields: Mapping[str, Any]) -> Any:
    """The file layout -> what the module with `fields` expects (e.g. stacked for scan=True)."""
    del fields
    return tree

  # ---- transfer ----
  def adapt(self, src: Flat, target: Mapping[str, Any], src_arch: Optional[Architecture],
            target_fields: Mapping[str, Any], image_size: Optional[tuple[int, int]], method: str,
            report: Any) -> Flat:
    """Resolution- or classifier-dependent tables of `src` adapted to `target` (flat, file layout)
    before the generic transfer; appends to report.reshaped / report.notes / report.dropped."""
    del target, src_arch, target_fields, image_size, method, report
    return src

  def check_transfer(self, src_arch: Optional[Architecture], target_fields: Mapping[str, Any],
                     image_size: Optional[tuple[int, int]]) -> None:
    """Raises a ValueError when a checkpoint of src_arch cannot move to this image size."""

  # ---- inspection (vit_jax.eval.attention, python -m vit_jax.inspect) ----
  def _undefined(self, analysis: str) -> NotImplementedError:
    return NotImplementedError(f'{analysis} is not defined for the {self.name} family: '
                               f'{self.inspect_note}')

  def token_layout(self, arch: Architecture) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """(prefix tokens, patch grid (gh, gw), input pixels per patch (ph, pw)) of the sequence that
    `attention_fn`'s maps index: the prefix tokens, then the patches in row-major order."""
    raise self._undefined('global self-attention (rollout, attention distance)')

  def reads_class_token(self, arch: Architecture) -> bool:
    """Whether the classifier reads prefix token 0 (a class token); False: it pools the patch
    tokens, and any prefix tokens (registers, an unused class token) are only attended to."""
    return self.token_layout(arch)[0] > 0

  def prefix_names(self, arch: Architecture) -> list[str]:
    """Names of the prefix tokens of `token_layout`, in order: 'class' (and 'distillation' for a
    second one), then 'register 1' .. 'register R' (the `num_registers` field: registers come last
    among the prefix tokens in every family here)."""
    prefix = self.token_layout(arch)[0]
    registers = int(arch.model_config.get('num_registers') or 0)
    if registers > prefix:
      raise ValueError(f'{registers} registers but only {prefix} prefix tokens')
    first = prefix - registers
    names = {1: ['class'], 2: ['class', 'distillation']}.get(
        first, [f'prefix {i + 1}' for i in range(first)])
    return names + [f'register {i + 1}' for i in range(registers)]

  def attention_fn(self, arch: Architecture) -> Any:
    """A function (params in the module layout, images [B, H, W, C]) -> (logits [B, classes], the
    softmax probabilities of every block, float32 [L, B, heads, N, N] (N = prefix + gh*gw)), the
    latter never from a fused kernel. Families with global attention return
    `aux_attention_fn(arch)`."""
    raise self._undefined('global self-attention (rollout, attention distance)')

  def position_table(self, flat: Flat, arch: Architecture) -> tuple[str, np.ndarray]:
    """(kind, [gh, gw, D]): the position embedding of the patch tokens (prefix rows dropped)."""
    raise self._undefined('a global position embedding')

  def patch_filters(self, flat: Flat, arch: Architecture) -> np.ndarray:
    """The kernel [kh, kw, C, D] of the conv that embeds pixel patches (default: `stem_kernel`)."""
    del arch
    if self.stem_kernel is None:
      raise self._undefined('a linear embedding of pixel patches')
    return np.asarray(flat[self.stem_kernel], np.float32)

  def __repr__(self) -> str:
    return f'<family {self.name}: {len(self.models)} models>'


def check_sizes(found: Mapping[str, Any], wanted: Mapping[str, Any], fields: Sequence[str],
                name: str = '') -> None:
  """Raises a ValueError listing every size field where `wanted` (a config) disagrees with `found`
  (what the parameters hold)."""
  wrong = []
  for f in fields:
    if wanted.get(f) is None or f not in found:
      continue
    a, b = found[f], wanted[f]
    if f.endswith('patch_size'):
      a, b = hw(a), hw(b)
    elif isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
      a, b = tuple(np.atleast_1d(a).tolist()), tuple(np.atleast_1d(b).tolist())
    if a != b:
      wrong.append(f'{f}={found[f]!r} (the config has {wanted[f]!r})')
  if wrong:
    raise ValueError(f'the checkpoint does not match the model config {name!r}: it has '
                     f'{", ".join(wrong)}')


def aux_attention_fn(arch: Architecture) -> Any:
  """`Family.attention_fn` of a model whose `return_aux=True` carries 'attention_weights'. Asking for
  the weights takes the explicit softmax even where the config names a fused kernel; float32, so that
  small weights survive a bfloat16 checkpoint's config."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = arch.create_model(attention_impl='explicit', dtype=jnp.float32)

  def fn(params, images):
    logits, aux = model.apply({'params': params}, images, return_aux=True)
    return logits, aux['attention_weights']
  return fn
