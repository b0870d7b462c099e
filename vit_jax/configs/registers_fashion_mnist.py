"""The attention-sink experiment (issue M §5; Darcet et al., "Vision Transformers Need Registers",
2024): `--config=registers_fashion_mnist:registers=0` and `...:registers=4`, the same run but for
the register tokens.

Model: width 192 (3 heads, MLP 768; ViT-Ti's blocks) at depth 6, patch 4 on 28x28 Fashion-MNIST (a
7x7 grid of 49 patches), a class token and learned position embeddings: the supervised ViT the
registers paper found artifacts in (DeiT III), small enough for 2 CPU cores. No augmentation
beyond flips and no label smoothing, so that nothing but the recipe's weight decay discourages
large-norm tokens. Both runs take the same steps on the same batches (seed 0); the register run
carries 4 more tokens (54 instead of 50), about 8% more compute per step.

Measured (`python -m vit_jax.inspect --sinks`, vit_jax/eval/sinks.py) and reported in the README.
"""
from vit_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_args(arg, registers='0', steps='1500')
  c = common.get_config()
  c.model = common.model_config('ViT-Ti_16')
  c.model.patch_size = 4
  c.model.num_layers = 6
  if int(args['registers']):
    c.model.num_registers = int(args['registers'])
  c.model.act = 'gelu'
  c.dataset = 'fashion_mnist'
  c.data_dir = None
  c.train_split, c.eval_split = 'train', 'test'
  c.image_size = 28
  c.channels = 1
  c.augment = 'resize_flip'
  c.batch_size = 128
  c.total_steps = int(args['steps'])
  c.warmup_steps = min(200, c.total_steps // 5)
  c.base_lr = 1e-3
  c.lr_decay = 'cosine'
  c.weight_decay = 0.05
  c.eval_every = 0          # once, at the end
  c.checkpoint_every = 500
  c.log_every = 50
  c.eval_batch_size = 1000
  c.cpu_devices = 2
  return c
