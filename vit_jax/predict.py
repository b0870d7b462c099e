"""Classify images with a trained or converted ViT.

    python -m vit_jax.predict --checkpoint PATH IMAGE_OR_FOLDER... [--model NAME] [--logits_out F.npy]

PATH: a workdir or orbax checkpoint of this project, a Google `.npz`, a timm or Hugging Face
directory, of any registered family. For a bare `.npz`, `--model` names the architecture; the class
count comes from the head. Prints the top-5 class names (indices when the checkpoint has none) with
probabilities per image. Images are resized to the model's size (an image already at that size passes
unchanged) and normalised as the checkpoint declares: timm's pretrained_cfg mean/std, Hugging Face's
preprocessor_config.json, [-1, 1] for Google's files and this project's runs.
`--logits_out` writes float32 logits [num_images, num_classes] in the order the images were given
(the files of a folder in sorted order).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import cli
from vit_jax.checkpoints import read_checkpoint
from vit_jax.data import IMAGE_EXTENSIONS, BadImageError
from vit_jax.data import preprocess
from vit_jax.families.base import Architecture
from vit_jax.models import params as params_lib


@dataclasses.dataclass
class Predictor:
  """A model ready to classify: architecture, parameters (the module's layout), class names, the
  token inputs its training objective adds at inference (prompts; None: none), and, for a run of
  this project, its objective's metadata, own parameters and run config (what `inspect` shows)."""
  arch: Architecture
  params: Any
  class_names: Optional[list[str]]
  tokens: Any = None
  objective: Optional[dict] = None
  objective_params: Any = None
  meta: Optional[dict] = None

  def __post_init__(self):
    self.model = self.arch.create_model()
    self._apply = jax.jit(lambda p, t, x: self.model.apply({'params': p}, x, tokens=t))

  def preprocess(self, path: str) -> np.ndarray:
    """float32 [H, W, C] at the model's size, normalised with the checkpoint's mean/std; raises
    BadImageError naming the file."""
    with open(path, 'rb') as f:
      raw = f.read()
    img = preprocess.eval_example(raw, tuple(self.arch.image_size), self.arch.channels, name=path)
    return preprocess.normalize(img, self.arch.mean, self.arch.std)

  def logits(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """float32 [N, num_classes] for float32 [N, H, W, C] normalised images."""
    if self.arch.num_classes is None:
      raise ValueError('this checkpoint has no classifier head (a self-supervised encoder, e.g. '
                       'MPP or MAE pre-training): fine-tune it on labelled data first '
                       '(configs/finetune.py:pretrained=PATH)')
    out = [np.asarray(self._apply(self.params, self.tokens, jnp.asarray(images[i:i + batch_size])),
                      np.float32) for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.arch.num_classes or 0), np.float32)

  def label(self, index: int) -> str:
    return self.class_names[index] if self.class_names else str(index)


def load_predictor(path: str, model: Optional[str] = None,
                   image_size: Optional[Sequence[int]] = None) -> Predictor:
  """Reads any supported checkpoint and its architecture (cross-checked with `model` if given)."""
  from vit_jax.convert.api import resolve_architecture  # pylint: disable=g-import-not-at-top
  from vit_jax import objectives  # pylint: disable=g-import-not-at-top
  ckpt = read_checkpoint(path)
  arch = resolve_architecture(ckpt, model=model, image_size=image_size)
  tree = params_lib.unflatten({k: np.asarray(v) for k, v in ckpt.params.items()})
  tree = arch.get_family().to_module_layout(tree, arch.model_config)
  tokens, own = None, None
  if ckpt.objective:  # e.g. prompt tuning: the trained prompts go in with every image
    own = params_lib.unflatten(ckpt.objective_params).get(objectives.OBJECTIVE_KEY, {})
    tokens = objectives.get(ckpt.objective['name']).inference_tokens(ckpt.objective, own)
  return Predictor(arch, tree, ckpt.class_names, tokens, ckpt.objective, own, ckpt.meta)


def list_images(inputs: Sequence[str]) -> list[str]:
  """Files as given; folders expanded to their image files (recursively) in sorted order, hidden
  ones (`.name`, e.g. macOS's `._photo.jpg`) left out as in training folders."""
  out = []
  for p in inputs:
    if os.path.isdir(p):
      found = []
      for root, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        found += [os.path.join(root, f) for f in files if not f.startswith('.')
                  and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
      found.sort()
      if not found:
        raise FileNotFoundError(f'no images ({", ".join(sorted(IMAGE_EXTENSIONS))}) in folder {p}')
      out += found
    elif os.path.isfile(p):
      out.append(p)
    else:
      raise FileNotFoundError(f'{p} does not exist')
  return out


def top_k(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
  """Per row, the k most probable (class index, softmax probability)."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return [[(int(i), float(p[i])) for i in row] for row, p in zip(order, probs)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = cli.parser('vit_jax.predict', __doc__.split('\n')[0])
  ap.add_argument('--checkpoint', required=True)
  cli.add_model(ap, help_text='registry name, for checkpoints without one')
  cli.add_image_size(ap)
  ap.add_argument('--logits_out', default=None, help='write float32 logits [N, K] here (.npy)')
  ap.add_argument('--batch_size', type=int, default=64)
  ap.add_argument('images', nargs='+', help='image files or folders')
  args = ap.parse_args(argv)
  try:
    predictor = load_predictor(args.checkpoint, args.model, args.image_size)
    paths = list_images(args.images)
  except cli.USAGE_ERRORS as e:
    return cli.fail(e)
  images, kept, failed = [], [], []
  for p in paths:
    try:
      images.append(predictor.preprocess(p))
      kept.append(p)
    except (BadImageError, OSError) as e:
      failed.append(p)
      print(f'error: cannot read {p}: {e}', file=sys.stderr)
  if failed and args.logits_out:
    print(f'error: {len(failed)} image(s) unreadable; no logits written (rows must match inputs)',
          file=sys.stderr)
    return 1
  logits = predictor.logits(np.stack(images) if images else np.zeros((0,)), args.batch_size)
  for path, best in zip(kept, top_k(logits)):
    print(path)
    for i, p in best:
      print(f'  {p:7.2%}  {predictor.label(i)}')
  if args.logits_out:
    np.save(args.logits_out, logits.astype(np.float32))
    print(f'logits {logits.shape} -> {args.logits_out}')
  return 1 if failed else 0


if __name__ == '__main__':
  cli.main_entry(main)
