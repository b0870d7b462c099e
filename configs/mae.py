"""MAE pre-training (He et al., 2022): `--config=configs/mae.py:model=ViT-B_16,dataset=imagenet2012`.

The paper's recipe: 75% of the patches hidden, a decoder of width 512, 8 blocks of 16 heads,
per-patch normalised pixel targets; AdamW (b2 0.95, weight decay 0.05) at 1.5e-4 x batch / 256
(2.4e-3 at batch 4096), 40 warm-up epochs and cosine decay, random resized crops and flips only
(this project's Inception crop keeps 5-100% of the area, the paper's 20-100%), fixed 2-D sin-cos position embeddings in the encoder and decoder, no dropout. 800
epochs of ImageNet-1k at batch 4096 are 250k steps. Labels are never read: any dataset (labels
ignored) or a folder of unlabelled images (root/*.jpg). The encoder is a plain model of this
project: fine-tune it with `configs/finetune.py:pretrained=WORKDIR`, export it with `vit_jax.convert`
(the decoder is left out).
"""
from configs import common


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='imagenet2012', epochs='800')
  c = common.get_config()
  c.model = common.model_config(args['model'])
  c.model.posemb = 'sincos2d'
  c.objective.name = 'mae'
  c.dataset = args['dataset']
  c.train_split = 'train[:99%]' if c.dataset == 'imagenet2012' else 'train'
  c.eval_split = 'train[99%:]' if c.dataset == 'imagenet2012' else 'test'
  c.image_size = 224
  c.augment = 'inception_crop'
  c.batch_size = 4096
  steps_per_epoch = 1_268_355 // c.batch_size if c.dataset == 'imagenet2012' else 100
  c.total_steps = int(args['epochs']) * steps_per_epoch
  c.warmup_steps = min(40 * steps_per_epoch, c.total_steps // 10)
  c.base_lr = 1.5e-4 * c.batch_size / 256
  c.lr_decay = 'cosine'
  c.optimizer = 'adam'
  c.b1, c.b2 = 0.9, 0.95
  c.weight_decay = 0.05
  c.grad_clip_norm = 0.0
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.log_every = 100
  return c
