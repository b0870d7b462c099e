"""Throughput benchmarks, one module per mode: `vit-jax benchmark MODE` (`python -m
vit_jax.benchmark MODE`, `python scripts/benchmark.py MODE` in a checkout).

  data    the input pipeline (__main__.py)        step    train-step variants side by side
  model   one model against timm / Hugging Face   loop    the training loop against its bare step
  tokens  train-step memory and time against the token count

Every step timed here is built by `vit_jax.train.build.build_training`, as training builds it.
"""
