"""Few-shot evaluation of any checkpoint's pre-logits features.

    python -m vit_jax.fewshot --checkpoint PATH --dataset D [--shots 1,5,10,25] [--seeds 3]
        [--method ridge|knn] [--l2_reg 1024] [--k 20] [--model NAME] [--image_size H[,W]]
        [--random_init] [--json_out F.json]

PATH: a run workdir or orbax checkpoint, a Google `.npz` (with --model), a timm or Hugging Face
directory, of any registered family. D: `fashion_mnist`, `digits`, a folder (`folder:PATH`) or a
prepared TFDS name (`--data_dir`). For each seed 0 .. seeds-1, `shots` training examples per class
are drawn; the method is fitted to their features and scored on the full test split.
  ridge: closed-form least squares to ±1 targets on whitened features with a nearly unregularised
         bias (big_vision's fewshot_lsr; the linear probe), strength --l2_reg (2^10).
  knn:   k nearest neighbours by cosine similarity of L2-normalised features, votes weighted
         exp(cos / 0.07).
Images get the model's preprocessing: its size and channels, its mean/std. Prints per shot count
the mean, std (over seeds, ddof 0), min and max accuracy; the last line is
`fewshot: D K-shot A%` for K the largest requested count <= 10 (the smallest one if all exceed 10).
--random_init scores a fresh initialisation (seed 0) of the same architecture instead: the
baseline that shows what training bought.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from vit_jax import cli


def _ints(value: str) -> list[int]:
  try:
    out = sorted({int(v) for v in value.split(',') if v.strip()})
  except ValueError:
    out = []
  if not out or out[0] < 1:
    import argparse  # pylint: disable=import-outside-toplevel
    raise argparse.ArgumentTypeError(f'shots {value!r}: use positive integers like 1,5,10,25')
  return out


def headline_shots(shots: Sequence[int]) -> int:
  """The shot count the last line reports: the largest <= 10, else the smallest."""
  small = [s for s in shots if s <= 10]
  return max(small) if small else min(shots)


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = cli.parser('vit_jax.fewshot', __doc__.split('\n')[0])
  ap.add_argument('--checkpoint', required=True)
  ap.add_argument('--dataset', required=True)
  ap.add_argument('--data_dir', default=None, help='Fashion-MNIST idx folder or TFDS data_dir')
  ap.add_argument('--shots', type=_ints, default=[1, 5, 10, 25], help='comma-separated')
  ap.add_argument('--seeds', type=int, default=3)
  ap.add_argument('--method', choices=('ridge', 'knn'), default='ridge')
  ap.add_argument('--l2_reg', type=float, default=2.0 ** 10)
  ap.add_argument('--k', type=int, default=20, help='neighbours of --method knn')
  ap.add_argument('--batch_size', type=int, default=256)
  ap.add_argument('--random_init', action='store_true',
                  help="score a fresh initialisation of the checkpoint's architecture")
  ap.add_argument('--json_out', default=None, help='write the accuracies per seed here')
  cli.add_model(ap, help_text='registry name, for checkpoints without one (a bare .npz)')
  cli.add_image_size(ap)
  args = ap.parse_args(argv)

  from vit_jax import predict  # pylint: disable=import-outside-toplevel
  from vit_jax.eval import fewshot  # pylint: disable=import-outside-toplevel
  try:
    if args.seeds < 1 or args.k < 1 or args.l2_reg <= 0 or args.batch_size < 1:
      raise ValueError('--seeds, --k and --batch_size must be >= 1 and --l2_reg > 0')
    loaded = predict.load_predictor(args.checkpoint, args.model, args.image_size)
    arch, params = loaded.arch, loaded.params
    if args.random_init:
      params = fewshot.random_params(arch)
    task = fewshot.FewshotTask(args.dataset, shots=args.shots, seeds=args.seeds,
                               data_dir=args.data_dir)
    results = fewshot.evaluate_checkpoint(arch, params, task, method=args.method,
                                          l2_reg=args.l2_reg, k=args.k,
                                          batch_size=args.batch_size)
  except cli.USAGE_ERRORS as e:
    return cli.fail(e)

  how = f'ridge, l2 {args.l2_reg:g}' if args.method == 'ridge' else f'k-NN, k {args.k}'
  h, w = arch.image_size
  init = ', random init' if args.random_init else ''
  print(f'{args.dataset}: {task.num_classes} classes, {len(task.test)} test images; {arch.name} '
        f'({arch.family}{init}) at {h}x{w}x{arch.channels}; {how}; {args.seeds} seed(s)')
  print(f'{"shots":>5}  {"mean":>7}  {"std":>6}  {"min":>7}  {"max":>7}')
  for shots, accs in results.items():
    print(f'{shots:>5}  {accs.mean():7.2%}  {accs.std():6.2%}  {accs.min():7.2%}  '
          f'{accs.max():7.2%}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'checkpoint': args.checkpoint, 'dataset': args.dataset, 'method': args.method,
                 'l2_reg': args.l2_reg, 'k': args.k, 'random_init': args.random_init,
                 'accuracy': {str(s): a.tolist() for s, a in results.items()}}, f, indent=1)
  k = headline_shots(list(results))
  print(f'fewshot: {args.dataset} {k}-shot {float(np.mean(results[k])):.2%}')
  return 0


if __name__ == '__main__':
  cli.main_entry(main)
