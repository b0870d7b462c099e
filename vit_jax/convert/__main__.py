"""`python -m vit_jax.convert --input PATH --to {timm,hf,npz,orbax} --output OUT [--verify]`.

Examples:
  python -m vit_jax.convert --input ViT-B_16.npz --to hf --output out/hf --class_names names.txt
  python -m vit_jax.convert --input out/timm --to npz --output out/model.npz --verify
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from vit_jax import cli
from vit_jax.convert.api import WRITERS, convert
from vit_jax.convert.verify import VerificationError


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = cli.parser('vit_jax.convert', __doc__)
  p.add_argument('--input', required=True,
                 help='a Google .npz (vit_jax or big_vision layout), a timm model.safetensors '
                      '(file or directory with config.json), a Hugging Face directory, or an '
                      'orbax checkpoint / workdir, of any registered family')
  p.add_argument('--to', required=True, choices=sorted(WRITERS))
  p.add_argument('--output', required=True, help='a directory (timm, hf, orbax) or a .npz path')
  cli.add_model(p, help_text='registry name (e.g. ViT-B_16) where the input does not carry its '
                'architecture; checked against the parameters')
  cli.add_image_size(p, help_text='H or H,W, for non-square inputs whose files do not say')
  p.add_argument('--class_names', default=None, help='a file with one class name per line')
  p.add_argument('--verify', action='store_true',
                 help='run both models on the same images (needs torch); fail above 1e-4')
  return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)

  def body() -> int:
    try:
      convert(args.input, args.to, args.output, model=args.model, image_size=args.image_size,
              class_names=args.class_names, verify=args.verify)
    except VerificationError as e:  # written, but wrong: a failed step of the work
      print(f'error: {e}', file=sys.stderr)
      return 1
    return 0
  return cli.run(body)


if __name__ == '__main__':
  cli.main_entry(main)
