"""ViT-B/16 summary and one forward pass on a real Fashion-MNIST batch resized to 224x224."""
import argparse
import gzip
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import models as registry
from vit_jax import summary
from vit_jax.models import create_model


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--data_dir', default='/usr/share/datasets/fashion-mnist')
  ap.add_argument('--batch', type=int, default=8)
  args = ap.parse_args()
  print(summary.summarize('ViT-B_16', 10, (224, 224)))
  with gzip.open(os.path.join(args.data_dir, 't10k-images-idx3-ubyte.gz')) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:args.batch]
  x = jnp.asarray(images, jnp.float32) / 127.5 - 1.0
  x = jax.image.resize(jnp.repeat(x, 3, axis=-1), (args.batch, 224, 224, 3), 'bilinear')
  model = create_model(registry.get_model_config('ViT-B_16'), 10)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  t = time.time()
  logits = jax.jit(model.apply)(params, x).block_until_ready()
  print(f'forward: {args.batch} Fashion-MNIST test images at 224x224 -> logits {logits.shape} '
        f'in {time.time() - t:.1f}s (untrained: the head is zero-initialised, so logits are 0)')


if __name__ == '__main__':
  main()
