"""The paper's pre-training recipe: `--config=configs/pretrain.py:model=ViT-B_16,dataset=imagenet2012`.

Adam (b1 0.9, b2 0.999), decoupled weight decay 0.1, batch 4096, linear warm-up over 10k steps then
linear decay, global-norm clipping at 1.0, dropout 0.1 (the paper's ImageNet setting), softmax
cross-entropy. Use accum_steps to fit batch 4096 on small hardware with the same mathematics.
"""
from vit_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='imagenet2012')
  c = common.get_config()
  c.model = common.model_config(args['model'])
  c.model.dropout_rate = 0.1
  c.dataset = args['dataset']
  c.train_split = 'train[:99%]' if c.dataset == 'imagenet2012' else 'train'
  c.eval_split = 'train[99%:]' if c.dataset == 'imagenet2012' else 'test'
  c.image_size = 224
  c.augment = 'inception_crop'
  c.batch_size = 4096
  c.total_steps = 93_000  # ~300 epochs of ImageNet-1k at batch 4096 (the paper's ImageNet runs)
  c.warmup_steps = 10_000
  c.base_lr = 3e-3
  c.lr_decay = 'linear'
  c.optimizer = 'adam'
  c.b1, c.b2 = 0.9, 0.999
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.loss = 'softmax_xent'
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.log_every = 100
  return c
