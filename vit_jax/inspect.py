"""Attention maps and the ViT paper's Fig. 7 analyses of a checkpoint, as PNGs and one web page.

    python -m vit_jax.inspect --checkpoint PATH --out DIR [IMAGES...] [--dataset NAME]
        [--num_images N] [--model NAME] [--image_size H[,W]]

PATH: anything `vit_jax.predict` reads (a workdir or orbax step of this project, a Google `.npz`
with --model, a timm or Hugging Face directory), of a family with global self-attention (ViT, DeiT,
hybrid); Mixer, Swin and PVT are refused with the reason. Writes into DIR:
  rollout_XX_<image>.png     attention rollout and the last layer's attention of what the classifier
                             reads (class token, or all tokens for pooled models), per IMAGE (else
                             per each of the first --rollout_images of the dataset)
  attention_distance.png     mean attention distance (pixels) per head and layer over the
  attention_distance.json    --num_images first images of --dataset's --split (else over IMAGES)
  token_shares.png           per layer, the attention the classifier's reader gives each prefix
  token_shares.json          token (class, distillation, each register) and the patches
  sinks.png, sinks.json      with --sinks: high-norm output patch tokens (Darcet et al., 2024) and
                             the share of the reader's last-layer attention they and the registers get
  posemb_similarity*.png     cosine similarity of the position embeddings (+ a sincos2d reference
                             for learned ones), with posemb_similarity.json
  patch_filters.png          principal components of the patch-embedding filters
  index.html                 all of them on one page
"""
from __future__ import annotations

from typing import Optional, Sequence

from vit_jax import cli


def main(argv: Optional[Sequence[str]] = None) -> int:
  ap = cli.parser('vit_jax.inspect', __doc__.split('\n')[0])
  ap.add_argument('--checkpoint', required=True)
  ap.add_argument('--out', required=True, help='output directory (created)')
  ap.add_argument('images', nargs='*', help='image files or folders for the rollout figures')
  ap.add_argument('--dataset', default=None,
                  help='fashion_mnist, digits, a folder, a TFDS name: images for the distance')
  ap.add_argument('--split', default='test', help="the dataset's split (default: test)")
  ap.add_argument('--data_dir', default=None)
  ap.add_argument('--num_images', type=int, default=128,
                  help='dataset images the attention distance averages over')
  ap.add_argument('--rollout_images', type=int, default=4,
                  help='rollout figures drawn from the dataset when no IMAGES are given')
  ap.add_argument('--batch_size', type=int, default=32)
  ap.add_argument('--sinks', action='store_true',
                  help='also measure high-norm output tokens ("attention sinks") and the attention '
                       'they draw over the distance images: sinks.json, sinks.png')
  ap.add_argument('--sink_factor', type=float, default=3.0,
                  help='a patch token is an outlier above this multiple of its image\'s median '
                       'norm (default 3)')
  cli.add_model(ap, help_text='registry name, for checkpoints without one')
  cli.add_image_size(ap)
  args = ap.parse_args(argv)

  def body() -> int:
    from vit_jax.eval import inspection  # pylint: disable=import-outside-toplevel
    from vit_jax.predict import load_predictor  # pylint: disable=import-outside-toplevel
    predictor = load_predictor(args.checkpoint, args.model, args.image_size)
    family = predictor.arch.get_family()
    family.token_layout(predictor.arch)  # refuses a family without attention maps, before data
    images = inspection.image_files(args.images, predictor.arch) if args.images else None
    dataset = (inspection.dataset_images(args.dataset, predictor.arch, args.num_images, args.split,
                                         args.data_dir) if args.dataset else None)
    report = inspection.inspect_checkpoint(
        predictor, args.out, images=images, dataset_imgs=dataset,
        rollout_count=args.rollout_images, batch_size=args.batch_size,
        source=args.checkpoint, sinks=args.sinks, sink_factor=args.sink_factor)
    for _, name, _ in report.figures:
      print(report.path(name))
    for name in report.data:
      print(report.path(name))
    for note in report.notes:
      print(f'note: {note}')
    print(f'inspect: {len(report.figures)} figures -> {report.path("index.html")}')
    return 0
  return cli.run(body)


if __name__ == '__main__':
  cli.main_entry(main)
