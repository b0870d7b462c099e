"""DeiT distillation on Fashion-MNIST: the quickstart's recipe (same steps, batch, learning rate,
augmentation) with a DeiT student of the quickstart model's size learning from a trained teacher.

    python -m vit_jax.main --config=configs/distill_fashion_mnist.py:teacher=PATH --workdir=DIR

teacher: any checkpoint this project reads, of any family, trained on Fashion-MNIST's 10 classes,
e.g. the quickstart's workdir (ViT-Mini_7). Also `kind=hard|soft` (default hard: DeiT's best),
`alpha=` (default 0.5) and `temperature=` (soft only, default 3). `--config.distill.*` overrides
the same keys.

Student: DeiT-Mini_7-distilled (width 128, depth 6, 4 heads, MLP 256, patch 7: a 4x4 grid plus the
class and distillation tokens) with the quickstart's fixed 2-D sin-cos position embeddings (zero on
the two prefix tokens) and its tanh GELU, so that only the tokens, heads and teacher differ. A DeiT
must classify its tokens, so unlike the quickstart there is no average pooling. Evaluation uses the
mean of the two heads.
"""
from vit_jax.configs import common, quickstart


def get_config(arg: str | None = None):
  args = common.parse_args(arg, teacher='', kind='hard', alpha='0.5', temperature='3.0',
                           model='DeiT-Mini_7-distilled')
  # The plain-ViT quickstart recipe (ViT-Mini_7's: 28 px, 2,100 steps), the teacher's.
  c = quickstart.get_config('model=ViT-Mini_7')
  c.model = common.model_config(args['model'])
  c.model.posemb = 'sincos2d'
  c.model.act = 'gelu_tanh'  # the quickstart ViT's GELU (DeiT's own default is the exact one)
  c.distill.teacher = args['teacher'] or None
  c.distill.kind = args['kind']
  c.distill.alpha = float(args['alpha'])
  c.distill.temperature = float(args['temperature'])
  return c
