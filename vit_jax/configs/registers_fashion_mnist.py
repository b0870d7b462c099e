"""The attention-sink experiment (issue M §5; Darcet et al., "Vision Transformers Need Registers",
2024): `--config=registers_fashion_mnist:registers=0` and `...:registers=4`, the same run but for
the register tokens.

Model: width 192 (3 heads, MLP 768; ViT-Ti's blocks) at depth 6, patch 4 on 28x28 Fashion-MNIST (a
7x7 grid of 49 patches), a class token and learned position embeddings: the supervised ViT the
registers paper found artifacts in (DeiT III), small enough for 2 CPU cores. No augmentation
beyond flips and no label smoothing, so that nothing but the recipe's weight decay discourages
large-norm tokens. Both runs take the same steps on the same batches (seed 0); the register run
carries 4 more tokens (54 instead of 50), about 8% more compute per step.

Measured (`python -m vit_jax.inspect --sinks`, vit_jax/eval/sinks.py) with `steps=500` (1.07
epochs; the 2 shared cores were loaded, ~50-65 img/s, 20 and 13 minutes): test top-1 79.25% without
registers, 79.76% with 4. Neither has high-norm tokens: over 1,000 test images no patch token
leaves the last block above 3x its image's median norm (max/median 1.36 on average, 2.72 at most,
without registers; 1.30 and 2.17 with). The class token's last-layer attention goes 98.0% to the
patches without registers; with them 9.3% goes to the registers (16% to register 3 in layer 3) and
87.5% to the patches. The paper saw the artifacts in large models trained long (ViT-L and up,
hundreds of epochs); this small, briefly trained model shows none, with or without registers.
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
  # The measured runs' split (the automatic rule picks 1 here: attention is 4.7% of the FLOPs);
  # the same mathematics either way, the README's numbers in this summation order.
  c.cpu_devices = 2
  return c
