"""Fine-tuning from pretrained weights: adapt a loaded checkpoint to a freshly initialised model.

`load_pretrained(path, init_params, ...)` reads any supported checkpoint (`read_checkpoint`) and
returns parameters with exactly the structure, shapes and dtypes of `init_params`, plus a report of
every difference. The generic rules here name no parameter; the target's family descriptor supplies
the paths:
  heads       (`head_prefixes`) a new class count -> a new head, zero kernel (the paper's recipe)
              and the target's initial bias;
  pre-logits  (`pre_logits_prefix`) kept or dropped by config (`keep_pre_logits`);
  optional    (`optional_prefixes`: class token, MAP head, ...) taken from the initialisation or
              dropped when one side lacks them;
  tables      (`family.adapt`) resolution-dependent tables: position embeddings resampled to the new
              grid, Swin's relative-position tables to the new window, a ViT's patch kernel
              PI-resized to another patch size (FlexiViT), ...;
  channels    (`stem_kernel`) a 3-channel input kernel summed into a 1-channel one (grey-scale).
Anything else that differs (depth, width, another family) is a ValueError naming the path and both
shapes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints.readers import Checkpoint, read_checkpoint
from vit_jax.families import registry, resample
from vit_jax.families.base import Family
from vit_jax.models import params as params_lib

Flat = dict[str, np.ndarray]


@dataclasses.dataclass
class LoadReport:
  """What `load_pretrained` changed. Paths are '/'-joined, unscanned."""
  source: str
  format: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  added: list[str] = dataclasses.field(default_factory=list)
  reshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    out = [f'loaded {len(self.loaded)} arrays from {self.source} ({self.format})']
    out += [f'  dropped  {p}' for p in self.dropped]
    out += [f'  added    {p} (from the initialisation)' for p in self.added]
    out += [f'  reshaped {p}: {a} -> {b}' for p, a, b in self.reshaped]
    out += [f'  note: {n}' for n in self.notes]
    return out

  def __str__(self) -> str:
    return '\n'.join(self.lines())


def target_family(model: Any) -> tuple[Family, dict[str, Any]]:
  """(family, fields) of a target given as a Flax module of a registered family or a fields dict."""
  if model is None:
    return registry.get_family('vit'), {}
  if isinstance(model, Mapping):
    fields = dict(model)
    return registry.family_of_config(fields), fields
  family = registry.family_of_module(model)
  return family, {f: getattr(model, f) for f in family.field_names()}


def _starts(path: str, prefixes: Sequence[str]) -> bool:
  return any(path == p or path.startswith(p) for p in prefixes)


def adapt_params(ckpt: Checkpoint, init_params: Any, *, model: Any = None,
                 image_size: Optional[Sequence[int]] = None, keep_pre_logits: Optional[bool] = None,
                 posemb_resize: Optional[str] = None, new_head: str = 'zeros'
                 ) -> tuple[Any, LoadReport]:
  """Adapts a read checkpoint to `init_params` (see the module docstring); returns (params, report).

  Args:
    ckpt: from `read_checkpoint`.
    init_params: the target's initial `params` tree (any layout the module uses; real arrays where
      something is added from the initialisation).
    model: the target Flax module (or its fields dict): its family and fields.
    image_size: the target (h, w) pixels; needed only for a non-square target grid.
    keep_pre_logits: True: keep the checkpoint's pre-logits layer (an error if the target has none);
      False: drop it (re-initialise it when the target has one); None: follow the target.
    posemb_resize: 'bilinear' (scipy.ndimage.zoom order=1, Google's) or 'bicubic' (antialiased),
      applied by the family to its resolution-dependent tables; None: the family's own default
      (`Family.default_resize`: bilinear for ViT position embeddings as Google, bicubic for Swin's
      relative-position tables as its authors and timm).
    new_head: 'zeros' (kernel 0, bias from the init, the paper's recipe) or 'init' (as initialised).
  """
  if posemb_resize is not None and posemb_resize not in resample.METHODS:
    raise ValueError(f'posemb_resize {posemb_resize!r} is not one of {resample.METHODS}')
  if new_head not in ('zeros', 'init'):
    raise ValueError(f"new_head {new_head!r} is not 'zeros' or 'init'")
  family, fields = target_family(model)
  posemb_resize = posemb_resize or family.default_resize
  src_family = (ckpt.architecture.family if ckpt.architecture is not None
                else registry.detect(ckpt.params).name)
  if src_family != family.name:
    raise ValueError(f'{ckpt.path} holds a {src_family} model; it cannot initialise a '
                     f'{family.name} model (choose a model of the {src_family} family)')
  report = LoadReport(ckpt.path, ckpt.format, notes=list(ckpt.notes))
  if ckpt.objective_params:  # a mask embedding, decoder or prompts: the writer's objective's own
    report.dropped.extend(sorted(ckpt.objective_params))
    report.notes.append(f'the {ckpt.objective["name"]} objective\'s own parameters (not part of '
                        'the model) are not loaded')
  target = params_lib.flatten(family.to_file_layout(init_params))
  size = tuple(image_size) if image_size is not None else None
  family.check_transfer(ckpt.architecture, fields, size)
  pre = family.pre_logits_prefix
  if keep_pre_logits and not (pre and any(p.startswith(pre) for p in target)):
    raise ValueError('keep_pre_logits=True, but the target model has no pre-logits layer: set '
                     'representation_size to the checkpoint\'s')
  drop_pre_logits = keep_pre_logits is False
  src = family.adapt(dict(ckpt.params), target, ckpt.architecture, fields, size, posemb_resize,
                     report)
  out: Flat = {}
  missing: list[str] = []
  unexpected: list[str] = []
  for path, init in target.items():
    shape = tuple(init.shape)
    if _starts(path, family.head_prefixes):
      if path in src and tuple(src[path].shape) == shape:
        out[path] = src.pop(path)
        continue
      if path in src:
        report.notes.append(f'{path}: {tuple(src[path].shape)} in the checkpoint, {shape} in the '
                            'model: a new head')
        src.pop(path)
      zero = new_head == 'zeros' and path.endswith('/kernel')
      out[path] = np.zeros(shape, init.dtype) if zero else np.asarray(init)
      report.added.append(path)
      continue
    if pre and path.startswith(pre) and drop_pre_logits:
      out[path] = np.asarray(init)
      report.added.append(path)
      src.pop(path, None)
      continue
    if path not in src:
      if _starts(path, family.optional_prefixes):
        out[path] = np.asarray(init)
        report.added.append(path)
        continue
      missing.append(f'{path} {shape}')
      continue
    value = src.pop(path)
    if tuple(value.shape) != shape:
      value = _adapt_shape(family, path, value, shape, report)
    out[path] = value
  for path in sorted(src):
    if _starts(path, family.optional_prefixes + family.head_prefixes):
      report.dropped.append(path)
    else:
      unexpected.append(f'{path} {tuple(src[path].shape)}')
  if missing or unexpected:
    raise ValueError(
        f'{ckpt.path} ({ckpt.format}) does not fit the model; the architectures differ (depth, '
        f'classifier or layout). In the model but not the checkpoint: {_some(missing)}. In the '
        f'checkpoint but not the model: {_some(unexpected)}.')
  report.loaded = sorted(p for p in out if p not in report.added)
  casted = {k: np.asarray(v).astype(target[k].dtype) for k, v in out.items()}
  return family.to_module_layout(params_lib.unflatten(casted), fields), report


def _some(paths: Sequence[str], limit: int = 6) -> str:
  if not paths:
    return 'none'
  more = f' and {len(paths) - limit} more' if len(paths) > limit else ''
  return ', '.join(paths[:limit]) + more


def _adapt_shape(family: Family, path: str, value: np.ndarray, shape: tuple[int, ...],
                 report: LoadReport):
  if path == family.stem_kernel and value.shape[:2] + value.shape[3:] == shape[:2] + shape[3:] \
      and shape[2] == 1:
    # Grey-scale inputs: a 3-channel filter summed over colour responds to grey x as to (x, x, x).
    report.reshaped.append((path, tuple(value.shape), shape))
    report.notes.append(f'{path}: summed {value.shape[2]} input channels into 1')
    return value.sum(axis=2, keepdims=True)
  raise ValueError(f'{path}: the checkpoint has shape {tuple(value.shape)}, the model {shape}; this '
                   'cannot be adapted')


def load_pretrained(path: str | os.PathLike, init_params: Any, *, model: Any = None,
                    model_config: Optional[Mapping[str, Any]] = None,
                    image_size: Optional[Sequence[int]] = None,
                    keep_pre_logits: Optional[bool] = None, posemb_resize: Optional[str] = None,
                    new_head: str = 'zeros', log: Optional[Callable[[str], None]] = logging.info,
                    **reader_kwargs: Any) -> tuple[Any, LoadReport]:
  """Reads `path` (any supported format) and adapts it to `init_params`; returns (params, report).

  Args:
    path: a Google `.npz` (either layout), a timm safetensors file or directory, a Hugging Face
      directory, or this project's orbax checkpoint or workdir.
    init_params: the target model's freshly initialised `params` tree (any image size and classes).
    model / model_config: the target Flax module or its fields dict (family, sizes, options).
    image_size: the target (h, w), needed only when its patch grid is not square.
    keep_pre_logits, posemb_resize, new_head: see `adapt_params`.
    log: called once per report line (None: silent).
  """
  target = model if model is not None else model_config
  # A timm file without config.json does not say what its weights cannot (e.g. the head count): the
  # target's fields are the best guess (the file's own config wins; a wrong guess fails the shape
  # checks below).
  reader_kwargs.setdefault('model_config', target_family(target)[1])
  ckpt = read_checkpoint(path, **reader_kwargs)
  params, report = adapt_params(ckpt, init_params, model=target,
                                image_size=image_size, keep_pre_logits=keep_pre_logits,
                                posemb_resize=posemb_resize, new_head=new_head)
  if log is not None:
    for line in report.lines():
      log(line)
  return params, report
