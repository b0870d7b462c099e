"""vit_jax: train, fine-tune and ship Vision Transformers with JAX and Flax."""
from vit_jax import runtime as _runtime

__version__ = '0.1.0'

# Before JAX starts a backend: XLA:CPU flags measured to be faster (vit_jax/runtime.py).
_runtime.set_xla_defaults()
