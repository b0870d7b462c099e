"""Masked patch prediction, the ViT paper's self-supervised pre-training (§4.6, Appendix B.1.2):
`--config=configs/mpp.py:model=ViT-B_16,dataset=imagenet2012`.

The paper's recipe: 50% of the patch embeddings corrupted (80% [mask], 10% another patch, 10% kept),
the 3-bit mean colour of each corrupted patch predicted (512 classes), Adam at a base learning rate
of 2e-4 with 10k warm-up steps and cosine decay, batch 4096 (it trained ViT-B/16 for 1M steps on
JFT; on ImageNet-1k 93k steps are 300 epochs). Labels are never read: `dataset` may be any dataset
(its labels ignored) or a folder of unlabelled images (root/*.jpg). `target=downsized|pixels`
(or `--config.mpp.target`) selects the paper's two alternatives. Fine-tune the result with
`configs/finetune.py:pretrained=WORKDIR` (the [mask] embedding and the head are dropped).
"""
from configs import common


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='imagenet2012', target='mean_color')
  c = common.get_config()
  c.model = common.model_config(args['model'])
  c.objective.name = 'mpp'
  c.mpp.target = args['target']
  c.dataset = args['dataset']
  c.train_split = 'train[:99%]' if c.dataset == 'imagenet2012' else 'train'
  c.eval_split = 'train[99%:]' if c.dataset == 'imagenet2012' else 'test'
  c.image_size = 224
  c.augment = 'inception_crop'
  c.batch_size = 4096
  c.total_steps = 93_000
  c.warmup_steps = 10_000
  c.base_lr = 2e-4
  c.lr_decay = 'cosine'
  c.optimizer = 'adam'
  c.b1, c.b2 = 0.9, 0.999
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.eval_every = 5000
  c.checkpoint_every = 1000
  c.log_every = 100
  return c
