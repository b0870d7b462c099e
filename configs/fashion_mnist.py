"""A longer Fashion-MNIST run from scratch: `--config=configs/fashion_mnist.py`.

ViT-Micro_4 (width 96, depth 4, 3 heads, patch 4: a 7x7 grid, 49 tokens) with global average pooling
and 2-D sin-cos position embeddings, ~19 epochs with pad-crop-flip augmentation and label smoothing;
the pre-training recipe (Adam, decoupled weight decay, warm-up and cosine decay, clipping at 1).
The finer patch grid is what takes it past the quickstart's patch-7 model.

Measured on the 2-core CPU machine (partly shared with other jobs): 90.18% test top-1 after 4,500 steps
in 40 minutes (83.6% at step 1,500, 88.7% at 3,000). The issue's 92% target is not reached yet: a
wider model and a longer schedule are the next things to try.
"""
from configs import common, quickstart


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-Micro_4')
  c = quickstart.get_config(f'model={args["model"]}')
  c.augment = 'pad_crop_flip'
  c.label_smoothing = 0.1
  c.batch_size = 256
  c.total_steps = 4500
  c.warmup_steps = 300
  c.base_lr = 2e-3
  c.weight_decay = 0.05
  c.eval_every = 1500
  c.checkpoint_every = 500
  return c
