"""Fine-tuning from pretrained weights: adapt a loaded checkpoint to a freshly initialised model.

`load_pretrained(path, init_params, ...)` reads any supported checkpoint (`read_checkpoint`) and
returns parameters with exactly the structure, shapes and dtypes of `init_params`, plus a report of
every difference. What adapts, following the paper's fine-tuning recipe:
  head        a new class count (or none in the checkpoint) -> a new head, zero kernel (the
              paper's recipe) and the target's initial bias;
  pre_logits  kept or dropped by config (`keep_pre_logits`, default: whatever the target has);
  posemb      a new patch grid -> the grid part resampled (`posemb.resample_posemb`), prefix rows
              kept; a class-token row added or dropped when the classifier changes; a fixed
              (`sincos2d`) target ignores learned embeddings with a warning: they are recomputed;
  cls / MAP   added from the initialisation or dropped when the classifier changes;
  channels    a 3-channel patch embedding summed into a 1-channel one (grey-scale fine-tuning).
Anything else that differs (depth, width, patch size) is a ValueError naming the path and both
shapes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints import posemb as posemb_lib
from vit_jax.checkpoints.arch import POSEMB_KEY
from vit_jax.checkpoints.readers import Checkpoint, read_checkpoint
from vit_jax.models import params as params_lib

Flat = dict[str, np.ndarray]
_HEAD = ('head/kernel', 'head/bias')
_ADAPTABLE_PREFIXES = ('head/', 'pre_logits/', 'MAPHead_0/')


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


def _grid_of(model: Any, image_size: Optional[Sequence[int]]) -> Optional[tuple[int, int]]:
  if model is None or image_size is None:
    return None
  p = model.patch_size if hasattr(model, 'patch_size') else model['patch_size']
  ph, pw = (p, p) if isinstance(p, int) else tuple(p)
  return int(image_size[0]) // ph, int(image_size[1]) // pw


def _field(model: Any, name: str, default: Any) -> Any:
  if model is None:
    return default
  if hasattr(model, name):
    return getattr(model, name)
  return model.get(name, default) if hasattr(model, 'get') else default


def adapt_params(ckpt: Checkpoint, init_params: Any, *, model: Any = None,
                 image_size: Optional[Sequence[int]] = None, keep_pre_logits: Optional[bool] = None,
                 posemb_resize: str = 'bilinear', new_head: str = 'zeros') -> tuple[Any, LoadReport]:
  """Adapts a read checkpoint to `init_params` (see the module docstring); returns (params, report).

  Args:
    ckpt: from `read_checkpoint`.
    init_params: the target's initial `params` tree (scanned or not; arrays or ShapeDtypeStructs are
      not enough where something is added: real arrays then).
    model: the target `VisionTransformer` or its config (for posemb kind, patch size, classifier).
    image_size: the target (h, w) pixels; needed only for a non-square target grid.
    keep_pre_logits: True: keep the checkpoint's pre-logits layer (an error if the target has none);
      False: drop it (re-initialise it when the target has one); None: follow the target.
    posemb_resize: 'bilinear' (scipy.ndimage.zoom order=1, Google's) or 'bicubic' (antialiased).
    new_head: 'zeros' (kernel 0, bias from the init, the paper's recipe) or 'init' (as initialised).
  """
  if posemb_resize not in posemb_lib.METHODS:
    raise ValueError(f'posemb_resize {posemb_resize!r} is not one of {posemb_lib.METHODS}')
  if new_head not in ('zeros', 'init'):
    raise ValueError(f"new_head {new_head!r} is not 'zeros' or 'init'")
  report = LoadReport(ckpt.path, ckpt.format, notes=list(ckpt.notes))
  scanned = params_lib.is_scanned(init_params)
  target = params_lib.flatten(params_lib.unstack_blocks(init_params))
  src = dict(ckpt.params)
  out: Flat = {}
  missing: list[str] = []
  unexpected: list[str] = []

  if keep_pre_logits and 'pre_logits/kernel' not in target:
    raise ValueError('keep_pre_logits=True, but the target model has no pre-logits layer: set '
                     f'representation_size (the checkpoint\'s is '
                     f'{src["pre_logits/kernel"].shape[1] if "pre_logits/kernel" in src else None})')
  drop_pre_logits = keep_pre_logits is False

  # Position embeddings first: their shape depends on the classifier as well as the grid.
  kind = _field(model, 'posemb', 'learned' if POSEMB_KEY in target else None)
  if POSEMB_KEY in src and POSEMB_KEY not in target:
    report.dropped.append(POSEMB_KEY)
    msg = (f'the target has posemb={kind!r}: the checkpoint\'s learned position embeddings are '
           'not used (fixed ones are recomputed)')
    report.notes.append(msg)
    logging.warning(msg)
    src.pop(POSEMB_KEY)
  if POSEMB_KEY in target and POSEMB_KEY in src:
    src[POSEMB_KEY] = _adapt_posemb(src, target, ckpt, model, image_size, posemb_resize, report)
  elif POSEMB_KEY in target:
    msg = ('the checkpoint has no learned position embeddings (a fixed or no position embedding): '
           'the target\'s learned ones start from their initialisation')
    report.notes.append(msg)
    logging.warning(msg)

  for path, init in target.items():
    shape, dtype = tuple(init.shape), init.dtype
    if path in _HEAD:
      if path in src and tuple(src[path].shape) == shape:
        out[path] = src.pop(path)
        continue
      if path in src:
        report.notes.append(f'{path}: {tuple(src[path].shape)} in the checkpoint, {shape} in the '
                            'model: a new head')
        src.pop(path)
      out[path] = (np.zeros(shape, dtype) if new_head == 'zeros' and path == 'head/kernel'
                   else np.asarray(init))
      report.added.append(path)
      continue
    if path.startswith('pre_logits/') and drop_pre_logits:
      out[path] = np.asarray(init)
      report.added.append(path)
      src.pop(path, None)
      continue
    if path not in src:
      if path.startswith(_ADAPTABLE_PREFIXES) or path in ('cls', POSEMB_KEY):
        out[path] = np.asarray(init)
        report.added.append(path)
        continue
      missing.append(f'{path} {shape}')
      continue
    value = src.pop(path)
    if tuple(value.shape) != shape:
      value = _adapt_shape(path, value, shape, report)
    out[path] = value
  for path in sorted(src):
    if path.startswith(_ADAPTABLE_PREFIXES) or path == 'cls':
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
  tree = params_lib.unflatten(casted)
  return (params_lib.stack_blocks(tree) if scanned else tree), report


def _some(paths: Sequence[str], limit: int = 6) -> str:
  if not paths:
    return 'none'
  more = f' and {len(paths) - limit} more' if len(paths) > limit else ''
  return ', '.join(paths[:limit]) + more


def _adapt_posemb(src: Flat, target: Mapping[str, Any], ckpt: Checkpoint, model: Any,
                  image_size: Optional[Sequence[int]], method: str, report: LoadReport) -> np.ndarray:
  pe = np.asarray(src[POSEMB_KEY])
  want = tuple(target[POSEMB_KEY].shape)
  old_prefix = 1 if 'cls' in src else 0
  new_prefix = 1 if 'cls' in target else 0
  if pe.shape[-1] != want[-1]:
    raise ValueError(f'{POSEMB_KEY}: the checkpoint has shape {tuple(pe.shape)}, the model {want}; '
                     'the widths differ, which cannot be adapted')
  if tuple(pe.shape) == want and old_prefix == new_prefix:
    return pe
  old_grid = ckpt.architecture.grid if ckpt.architecture is not None else None
  if old_grid is not None and old_grid[0] * old_grid[1] != pe.shape[1] - old_prefix:
    old_grid = None
  old_grid = old_grid or posemb_lib.square_grid(pe.shape[1] - old_prefix)
  new_grid = _grid_of(model, image_size) or posemb_lib.square_grid(want[1] - new_prefix)
  if new_grid[0] * new_grid[1] + new_prefix != want[1]:
    raise ValueError(f'image size {image_size} does not match the model\'s {want[1]} position '
                     'embeddings')
  if old_prefix > new_prefix:
    report.notes.append(f'{POSEMB_KEY}: dropped the class-token row (the target has no class token)')
    pe = pe[:, old_prefix:]
  elif new_prefix > old_prefix:
    report.notes.append(f'{POSEMB_KEY}: added a class-token row from the initialisation')
    pe = np.concatenate([np.asarray(target[POSEMB_KEY])[:, :new_prefix].astype(pe.dtype), pe], 1)
  out = posemb_lib.resample_posemb(pe, new_grid, num_prefix=new_prefix, old_grid=old_grid,
                                   method=method)
  if old_grid != tuple(new_grid):
    report.reshaped.append((POSEMB_KEY, tuple(src[POSEMB_KEY].shape), tuple(out.shape)))
    report.notes.append(f'{POSEMB_KEY}: grid {old_grid[0]}x{old_grid[1]} -> '
                        f'{new_grid[0]}x{new_grid[1]} ({method})')
  return out


def _adapt_shape(path: str, value: np.ndarray, shape: tuple[int, ...], report: LoadReport):
  if path == 'embedding/kernel' and value.shape[:2] + value.shape[3:] == shape[:2] + shape[3:] \
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
                    keep_pre_logits: Optional[bool] = None, posemb_resize: str = 'bilinear',
                    new_head: str = 'zeros', log: Optional[Callable[[str], None]] = logging.info,
                    **reader_kwargs: Any) -> tuple[Any, LoadReport]:
  """Reads `path` (any supported format) and adapts it to `init_params`; returns (params, report).

  Args:
    path: a Google `.npz` (either layout), a timm safetensors file or directory, a Hugging Face ViT
      directory, or (with the checkpoint manager) this project's orbax checkpoint or workdir.
    init_params: the target model's freshly initialised `params` tree (any image size and classes).
    model / model_config: the target `VisionTransformer` or its config (posemb kind, patch size).
    image_size: the target (h, w), needed only when its patch grid is not square.
    keep_pre_logits, posemb_resize, new_head: see `adapt_params`.
    log: called once per report line (None: silent).
  """
  target = model if model is not None else model_config
  # A timm file without config.json does not say its head count: the target's is the best guess
  # (the reader prefers the file's own, and a wrong guess fails the shape checks below).
  if _field(target, 'num_heads', None) is not None:
    reader_kwargs.setdefault('num_heads', int(_field(target, 'num_heads', None)))
  ckpt = read_checkpoint(path, **reader_kwargs)
  params, report = adapt_params(ckpt, init_params, model=target,
                                image_size=image_size, keep_pre_logits=keep_pre_logits,
                                posemb_resize=posemb_resize, new_head=new_head)
  if log is not None:
    for line in report.lines():
      log(line)
  return params, report

