"""The default job of scripts/quickstart.sh: a small ViT from scratch on Fashion-MNIST, ~10 minutes on
2 CPU cores, with the pre-training recipe (Adam, weight decay, warm-up and cosine decay, clipping).

Model: ViT-Mini_7 (width 128, depth 6, 4 heads, patch 7: a 4x4 grid, 17 tokens with the class token).
"""
from configs import common


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-Mini_7')
  c = common.get_config()
  c.model = common.model_config(args['model'])
  c.dataset = 'fashion_mnist'
  c.data_dir = None
  c.train_split, c.eval_split = 'train', 'test'
  c.image_size = 28
  c.channels = 1
  c.augment = 'pad_crop_flip'
  c.batch_size = 256
  c.total_steps = 2000
  c.warmup_steps = 100
  c.base_lr = 2e-3
  c.lr_decay = 'cosine'
  c.weight_decay = 0.05
  c.label_smoothing = 0.0
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.log_every = 50
  c.eval_batch_size = 1000
  c.mesh = (('data', -1), ('fsdp', 1), ('tensor', 1))
  return c
