"""Ways to train: one module per objective (classify, distill, mpp, mae, prompt), `registry.py`
collects them. See `base.py` for what an objective owns."""
from vit_jax.objectives.base import OBJECTIVE_KEY, ArraySpec, Objective, model_params, own_params
from vit_jax.objectives.registry import (check, config_blocks, create, from_keywords, get,
                                         name_of, names, of_meta)

__all__ = ['OBJECTIVE_KEY', 'ArraySpec', 'Objective', 'check', 'config_blocks', 'create',
           'from_keywords', 'get',
           'model_params', 'name_of', 'names', 'of_meta', 'own_params']
