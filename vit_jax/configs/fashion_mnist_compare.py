"""Families side by side on Fashion-MNIST at 32x32: the same recipe, steps and data for each model.

    python -m vit_jax.main --config=configs/fashion_mnist_compare.py:model=Swin-Mini --workdir=DIR

model: Swin-Mini (patch 2, window 4: 16x16, 8x8, 4x4 token maps), PVTv2-mini (four stages, 8x8 to
1x1) or ViT-Mini_4 (patch 4: an 8x8 grid), each about a million parameters; any registered name
works. The recipe is the quickstart's (Adam, decoupled weight decay 0.05, warm-up then cosine,
flips, batch 256), with the images resized from 28 to 32 pixels so that Swin's windows and PVT's
strides divide them. README ("Families on Fashion-MNIST") has the measured accuracies.
"""
from vit_jax.configs import common, quickstart


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='Swin-Mini', steps='1500')
  # The plain-ViT quickstart recipe (no smoothing), the one these comparisons were measured with.
  c = quickstart.get_config('model=ViT-Mini_7')
  c.model = common.model_config(args['model'])
  if args['model'].startswith('ViT-'):
    c.model.classifier = 'gap'     # the quickstart ViT's choices
    c.model.posemb = 'sincos2d'
  c.image_size = 32
  c.total_steps = int(args['steps'])
  c.warmup_steps = 100
  c.checkpoint_every = 500
  return c
