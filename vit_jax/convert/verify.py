"""`--verify`: run this project's model and the exported PyTorch one on the same images.

torch (and timm or transformers) are imported here only, inside the functions: writing an export
needs neither. Inputs are uniform in [-1, 1] (the models' pixel range), NHWC for Flax and NCHW for
PyTorch; both run in float32 with full-precision matmuls.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from vit_jax.families.base import Architecture

TOLERANCE = 1e-4


class VerificationError(ValueError):
  """The export was written but does not reproduce the model: a failure of the work (the command
  exits 1), not of its input (2)."""


def sample_images(arch: Architecture, batch: int = 2, seed: int = 0) -> np.ndarray:
  """[batch, h, w, channels] float32 uniform in [-1, 1] (any normalisation: both sides get the
  same tensor)."""
  rng = np.random.RandomState(seed)
  return rng.uniform(-1, 1, (batch, *arch.image_size, arch.channels)).astype(np.float32)


def our_logits(flat: Mapping[str, np.ndarray], arch: Architecture, images: np.ndarray) -> np.ndarray:
  """Logits (or pre-logits features without a head) of this project's model, float32."""
  import jax  # pylint: disable=import-outside-toplevel
  from vit_jax.models import params as params_lib  # pylint: disable=import-outside-toplevel
  model = arch.create_model()
  params = params_lib.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  params = arch.get_family().to_module_layout(params, arch.model_config)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x))  # Jitted: op-by-op is far slower.
  with jax.default_matmul_precision('highest'):
    return np.asarray(apply(params, images), np.float32)


def _torch_images(images: np.ndarray):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def load_timm_model(out_dir: str):
  """The timm model `write_timm` describes, built from its config.json and loaded with its weights
  through timm's own pretrained path (`pretrained_cfg_overlay=dict(file=...)`)."""
  from vit_jax.convert import torchvision_stub  # pylint: disable=import-outside-toplevel
  timm = torchvision_stub.import_timm()  # through a stand-in where no torchvision build loads
  with open(os.path.join(out_dir, 'config.json')) as f:
    config = json.load(f)
  args = dict(config['model_args'])
  overlay = dict(file=os.path.join(out_dir, 'model.safetensors'), num_classes=args['num_classes'])
  model = timm.create_model(config['architecture'], pretrained=True, pretrained_cfg_overlay=overlay,
                            **args)
  return model.eval()


def timm_logits(out_dir: str, images: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  model = load_timm_model(out_dir)
  with torch.no_grad():
    return model(_torch_images(images)).numpy()


def load_hf_model(out_dir: str):
  """`AutoModelForImageClassification.from_pretrained(out_dir)` (ViTForImageClassification, ...), or
  `AutoModel` where config.json names a bare encoder (Dinov2Model, SiglipVisionModel); raises if
  any key is missing/unexpected."""
  import transformers  # pylint: disable=import-outside-toplevel
  with open(os.path.join(out_dir, 'config.json')) as f:
    names = json.load(f).get('architectures') or ['ForImageClassification']
  auto = (transformers.AutoModelForImageClassification
          if names[0].endswith('ForImageClassification') else transformers.AutoModel)
  model, info = auto.from_pretrained(out_dir, output_loading_info=True)
  bad = {k: v for k, v in info.items() if v and k in ('missing_keys', 'unexpected_keys',
                                                       'mismatched_keys')}
  if bad:
    raise ValueError(f'transformers loaded {out_dir} with {bad}')
  return model.eval()


def hf_logits(out_dir: str, images: np.ndarray) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  model = load_hf_model(out_dir)
  with torch.no_grad():
    out = model(pixel_values=_torch_images(images))
  # A bare encoder's pooled output is this project's headless model's pre-logits; one without a
  # pooling head (SigLIP's with vision_use_head=False) stands for mean pooling of its tokens.
  if getattr(out, 'logits', None) is not None:
    return out.logits.numpy()
  pooled = out.pooler_output
  return (pooled if pooled is not None else out.last_hidden_state.mean(dim=1)).numpy()


def verify_export(target: str, out_dir: str, flat: Mapping[str, np.ndarray], arch: Architecture,
                  *, batch: int = 2, seed: int = 0, tolerance: float = TOLERANCE) -> float:
  """Largest |logit difference| between this project's model and the export; raises above tolerance.
  """
  images = sample_images(arch, batch, seed)
  ours = our_logits(flat, arch, images)
  if target == 'timm':
    try:
      theirs = timm_logits(out_dir, images)
    except ImportError as e:
      raise ImportError(
          f'--verify --to timm needs torch and timm ({e}); the export itself is written in '
          f'{out_dir}. pip install "vit_jax[torch]" and timm (see the README\'s Install)') from e
  elif target == 'hf':
    theirs = hf_logits(out_dir, images)
  else:
    raise ValueError(f'no PyTorch model to verify for target {target!r}')
  if theirs.shape != ours.shape:
    raise VerificationError(f'logit shapes differ: ours {ours.shape}, {target} {theirs.shape}')
  diff = float(np.abs(ours - theirs).max())
  if not diff <= tolerance:
    raise VerificationError(f'--verify failed: largest |logit difference| {diff:.3g} > '
                            f'{tolerance:g}')
  return diff

