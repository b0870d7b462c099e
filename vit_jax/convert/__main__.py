"""`python -m vit_jax.convert --input PATH --to {timm,hf,npz,orbax} --output OUT [--verify]`.

Examples:
  python -m vit_jax.convert --input ViT-B_16.npz --to hf --output out/hf --class_names names.txt
  python -m vit_jax.convert --input out/timm --to npz --output out/model.npz --verify
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vit_jax.convert.api import WRITERS, convert


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m vit_jax.convert', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--input', required=True,
                 help='a Google .npz (vit_jax or big_vision layout), a timm model.safetensors '
                      '(file or directory with config.json), a Hugging Face ViT directory, or an '
                      'orbax checkpoint')
  p.add_argument('--to', required=True, choices=sorted(WRITERS))
  p.add_argument('--output', required=True, help='a directory (timm, hf, orbax) or a .npz path')
  p.add_argument('--model', default=None,
                 help='registry name (e.g. ViT-B_16) where the input does not carry its architecture')
  p.add_argument('--image_size', default=None, type=int, nargs='+', metavar='PIXELS',
                 help='H [W], for non-square inputs whose files do not say')
  p.add_argument('--class_names', default=None, help='a file with one class name per line')
  p.add_argument('--verify', action='store_true',
                 help='run both models on the same images (needs torch); fail above 1e-4')
  args = p.parse_args(argv)
  if args.image_size is not None and len(args.image_size) not in (1, 2):
    p.error('--image_size takes H or H W')
  return args


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  size = args.image_size
  if size is not None and len(size) == 1:
    size = [size[0], size[0]]
  try:
    convert(args.input, args.to, args.output, model=args.model, image_size=size,
            class_names=args.class_names, verify=args.verify)
  except (ValueError, FileNotFoundError, NotImplementedError, ImportError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
