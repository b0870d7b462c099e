"""`convert(...)`: read any supported checkpoint, settle its architecture, write it in another format.

Targets are a registry (`WRITERS`): 'timm', 'hf', 'npz' (Google's layout, for the families that have
one) and 'orbax' (this project's checkpoint). The family's interop (`registry.interop`) maps the
keys and says what a target cannot express; `python -m vit_jax.convert` is a thin face over this.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from vit_jax.checkpoints.npz import read_npz, write_npz
from vit_jax.checkpoints.readers import Checkpoint, read_checkpoint
from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.formats import hf, timm
from vit_jax.convert.verify import VerificationError

Flat = dict[str, np.ndarray]
# writer(output, flat params, architecture, class names or None) -> the path written.
Writer = Callable[[str, Flat, Architecture, Optional[Sequence[str]]], str]


def _write_npz(output: str, flat: Flat, arch: Architecture, class_names) -> str:
  del class_names  # Google's layout carries none.
  interop = registry.interop(arch.family)
  if not interop.writes_npz:
    raise ValueError(f'Google released no .npz layout for the {interop.name} family; export with '
                     '`--to timm` or `--to orbax`')
  bad = interop.npz_keys_ok(flat)
  if bad:
    raise ValueError(f'not in Google\'s layout (unscanned, Google names): {bad[:5]}')
  path = output if output.endswith('.npz') else os.path.join(output, 'model.npz')
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  write_npz(path, flat)
  return path


def _write_orbax(output: str, flat: Flat, arch: Architecture, class_names) -> str:
  from vit_jax.checkpoints import manager  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  meta = {'architecture': arch.to_meta(), 'class_names': list(class_names) if class_names else None}
  tree = arch.get_family().to_module_layout(params_lib.unflatten(flat), arch.model_config)
  return manager.save_params(output, tree, meta)


WRITERS: dict[str, Writer] = {'timm': timm.write_timm, 'hf': hf.write_hf, 'npz': _write_npz,
                              'orbax': _write_orbax}
VERIFIABLE = ('timm', 'hf', 'npz')


@dataclasses.dataclass
class ConvertResult:
  """What `convert` did: the input's format, the architecture, the written path, notes, and the
  largest |logit difference| when verified."""
  input_format: str
  architecture: Architecture
  output: str
  notes: list[str]
  max_abs_diff: Optional[float] = None


def read_class_names(path: str) -> list[str]:
  """One class name per line (blank lines ignored)."""
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def resolve_architecture(ckpt: Checkpoint, *, model: Optional[str] = None,
                         image_size: Optional[Sequence[int]] = None) -> Architecture:
  """The checkpoint's architecture, cross-checked against the registry model `model` if given.

  Size fields that disagree with the parameters are a ValueError naming the field and both values.
  """
  cfg: dict[str, Any] = {}
  family = None
  if model is not None:
    family = registry.family_of(model)
    cfg = dict(registry.get_model_config(model))
  carried = ckpt.architecture
  if carried is not None:
    if family is not None and family.name != carried.family:
      raise ValueError(f'{ckpt.path} holds a {carried.family} model, not {model} ({family.name})')
    family = carried.get_family()
    if model is not None:  # Only to cross-check the sizes.
      family.infer(ckpt.params, model_config={**carried.model_config, **cfg},
                   image_size=image_size or carried.image_size)
    cfg = {**cfg, **carried.model_config}
    if image_size is None:
      image_size = carried.image_size
  family = family or registry.detect(ckpt.params)
  arch = family.infer(ckpt.params, model_config=cfg, image_size=image_size)
  if carried is not None:
    arch.mean, arch.std, arch.channels = carried.mean, carried.std, carried.channels
  return arch


def convert(input_path: str | os.PathLike, to: str, output: str | os.PathLike, *,
            model: Optional[str] = None, image_size: Optional[Sequence[int]] = None,
            class_names: Optional[Sequence[str] | str] = None, verify: bool = False,
            log: Optional[Callable[[str], None]] = print) -> ConvertResult:
  """Converts a checkpoint (`read_checkpoint` formats) to `to` in WRITERS.

  Args:
    input_path: a Google `.npz`, a timm safetensors file/directory, a Hugging Face directory, or an
      orbax checkpoint, of any registered family.
    to: 'timm', 'hf', 'npz' or 'orbax'.
    output: a directory (timm, hf, orbax) or a `.npz` path (npz; a directory gets model.npz).
    model: a registry name (`ViT-B_16`, `Mixer-B_16`) where the input does not carry its
      architecture; checked against the parameters.
    image_size: (h, w), for non-square inputs whose files do not say.
    class_names: a list or a file with one per line (else the checkpoint's, when it has them).
    verify: run both models on the same images (needs torch) and fail above 1e-4 (npz: re-read
      and compare bitwise).
  """
  if to not in WRITERS:
    raise ValueError(f'unknown target {to!r}; known: {sorted(WRITERS)}')
  kwargs = {}
  if model is not None:
    kwargs['model_config'] = dict(registry.get_model_config(model))
  ckpt = read_checkpoint(input_path, **kwargs)
  if ckpt.objective and to != 'orbax':
    from vit_jax import objectives  # pylint: disable=import-outside-toplevel
    why = objectives.get(ckpt.objective['name']).exportable
    if why and ckpt.objective_params:
      raise ValueError(f'{input_path} was trained with objective {ckpt.objective["name"]!r}; it '
                       f'cannot be written as {to}: {why}')
  arch = resolve_architecture(ckpt, model=model, image_size=image_size)
  names = read_class_names(class_names) if isinstance(class_names, str) else class_names
  names = list(names) if names is not None else ckpt.class_names
  if names is not None and arch.num_classes is None and class_names is None:
    names = None  # a headless encoder (self-supervised) of a labelled dataset
  if names is not None and len(names) != (arch.num_classes or 0):
    raise ValueError(f'{len(names)} class names for a head of {arch.num_classes} classes')
  written = WRITERS[to](os.fspath(output), ckpt.params, arch, names)
  notes = list(ckpt.notes)
  if ckpt.objective_params:
    groups = sorted({'/'.join(k.split('/')[:2]) for k in ckpt.objective_params})
    notes.append(f'left out the {ckpt.objective["name"]} objective\'s own parameters (not part of '
                 f'the model): {len(ckpt.objective_params)} arrays under {", ".join(groups)}')
  result = ConvertResult(ckpt.format, arch, written, notes)
  if verify:
    result.max_abs_diff = verify_written(to, written, ckpt.params, arch)
  if log is not None:
    for note in result.notes:
      log(f'note: {note}')
    log(f'wrote {to} to {written} ({arch.family} {arch.name}, {arch.num_classes} classes, '
        f'{arch.image_size[0]}x{arch.image_size[1]})')
    if result.max_abs_diff is not None:
      log(f'verify: largest |logit difference| = {result.max_abs_diff:.3g}')
  return result


def verify_written(to: str, written: str, flat: Mapping[str, np.ndarray],
                   arch: Architecture) -> float:
  """The largest |logit difference| (or, for npz, |parameter difference|) of the written export."""
  if to == 'npz':
    back, _ = read_npz(written)
    if set(back) != set(flat):
      raise VerificationError(
          f'npz round trip changed the paths: {sorted(set(back) ^ set(flat))}')
    diff = max(float(np.abs(back[k] - np.asarray(flat[k], np.float32)).max()) for k in flat)
    if diff > 0:
      raise VerificationError(f'npz round trip changed values by up to {diff:.3g}')
    return diff
  if to not in VERIFIABLE:
    raise ValueError(f'--verify supports {VERIFIABLE}, not {to!r}')
  from vit_jax.convert import verify  # pylint: disable=import-outside-toplevel
  return verify.verify_export(to, os.path.dirname(written) if to == 'timm' else written, flat, arch)
