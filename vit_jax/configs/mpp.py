"""Masked patch prediction, the ViT paper's self-supervised pre-training (§4.6, Appendix B.1.2):
`--config=configs/mpp.py:model=ViT-B_16,dataset=imagenet2012`.

The paper's recipe: 50% of the patch embeddings corrupted (80% [mask], 10% another patch, 10% kept),
the 3-bit mean colour of each corrupted patch predicted (512 classes), Adam at a base learning rate
of 2e-4 with 10k warm-up steps and cosine decay, batch 4096 (it trained ViT-B/16 for 1M steps on
JFT); the rest is `configs/pretrain.py`'s (93k steps: 300 epochs of ImageNet-1k). Labels are never read: `dataset` may be any dataset
(its labels ignored) or a folder of unlabelled images (root/*.jpg). `target=downsized|pixels`
(or `--config.mpp.target`) selects the paper's two alternatives. Fine-tune the result with
`configs/finetune.py:pretrained=WORKDIR` (the [mask] embedding and the head are dropped).
"""
from vit_jax.configs import common, pretrain


def get_config(arg: str | None = None):
  args = common.parse_args(arg, model='ViT-B_16', dataset='imagenet2012', target='mean_color')
  c = pretrain.get_config(f'model={args["model"]},dataset={args["dataset"]}')
  c.objective.name = 'mpp'
  c.mpp.target = args['target']
  c.base_lr = 2e-4
  c.lr_decay = 'cosine'
  return c
