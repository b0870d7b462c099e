"""The paper's fine-tuning recipe: `--config=configs/finetune.py:model=ViT-B_16,dataset=cifar10`.

SGD with momentum 0.9, no weight decay, batch 512, cosine decay after 500 warm-up steps, global-norm
clipping at 1.0, a zero-initialised new head, resolution 384. `pretrained=PATH` (or
`--config.pretrained`) loads weights and resizes the position embeddings to the new grid.
"""
from vit_jax.configs import common

# Steps of the paper's Table 6 (fine-tuning schedules) per dataset.
STEPS = {'cifar10': 10_000, 'cifar100': 10_000, 'oxford_iiit_pet': 500, 'oxford_flowers102': 500,
         'imagenet2012': 20_000}


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='cifar10', pretrained='')
  c = common.get_config()
  c.model = common.model_config(args['model'])
  c.model.head_zeroinit = True
  c.dataset = args['dataset']
  c.pretrained = args['pretrained'] or None
  c.train_split = 'train[:98%]' if c.dataset in ('cifar10', 'cifar100') else 'train'
  c.eval_split = 'test'
  c.image_size = 384
  c.augment = 'inception_crop'
  c.batch_size = 512
  c.total_steps = STEPS.get(c.dataset, 10_000)
  c.warmup_steps = min(500, c.total_steps // 10)
  c.base_lr = 0.03
  c.lr_decay = 'cosine'
  c.optimizer = 'sgd'
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.grad_clip_norm = 1.0
  c.eval_every = max(100, c.total_steps // 10)
  c.checkpoint_every = max(100, c.total_steps // 10)
  c.log_every = 50
  return c
