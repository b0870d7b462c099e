"""MAE pre-training (He et al., 2022): `--config=configs/mae.py:model=ViT-B_16,dataset=imagenet2012`.

The paper's recipe: 75% of the patches hidden, a decoder of width 512, 8 blocks of 16 heads,
per-patch normalised pixel targets; AdamW (b2 0.95, weight decay 0.05) at 1.5e-4 x batch / 256
(2.4e-3 at batch 4096), 40 warm-up epochs and cosine decay, random resized crops and flips only
(this project's Inception crop keeps 5-100% of the area, the paper's 20-100%), fixed 2-D sin-cos position embeddings in the encoder and decoder, no dropout. 800
epochs of ImageNet-1k at batch 4096 are 250k steps (`epochs=`; a dataset other than ImageNet counts
100 steps an epoch). The rest is `configs/pretrain.py`'s. Labels are never read: any dataset (labels
ignored) or a folder of unlabelled images (root/*.jpg). The encoder is a plain model of this
project: fine-tune it with `configs/finetune.py:pretrained=WORKDIR`, export it with `vit_jax.convert`
(the decoder is left out).
"""
from vit_jax.configs import common, pretrain

IMAGENET_TRAIN = 1_268_355  # images in train[:99%] of imagenet2012


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='imagenet2012', epochs='800')
  c = pretrain.get_config(f'model={args["model"]},dataset={args["dataset"]}')
  c.objective.name = 'mae'
  c.model.posemb = 'sincos2d'
  c.model.dropout_rate = 0.0
  steps_per_epoch = IMAGENET_TRAIN // c.batch_size if c.dataset == 'imagenet2012' else 100
  c.total_steps = int(args['epochs']) * steps_per_epoch
  c.warmup_steps = min(40 * steps_per_epoch, c.total_steps // 10)
  c.base_lr = 1.5e-4 * c.batch_size / 256
  c.lr_decay = 'cosine'
  c.b1, c.b2 = 0.9, 0.95
  c.weight_decay = 0.05
  c.grad_clip_norm = 0.0
  return c
