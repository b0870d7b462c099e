"""Evaluation and analysis of trained models, on any checkpoint the project reads.

  attention.py   attention rollout, mean attention distance, position-embedding similarity,
                 patch-embedding principal components (numpy; the ViT paper's Fig. 7)
  plots.py       their figures (matplotlib, Agg backend, imported lazily)
  inspection.py  checkpoint + images -> every figure, a JSON of the numbers and an index.html
                 (`python -m vit_jax.inspect`)
  fewshot.py     few-shot linear evaluation of pre-logits features: closed-form ridge regression
                 (big_vision's fewshot_lsr) and k-NN; `python -m vit_jax.fewshot` and `config.fewshot`
"""
