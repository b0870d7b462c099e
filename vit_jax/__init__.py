"""vit_jax: train, fine-tune and ship Vision Transformers with JAX and Flax."""
__version__ = '0.1.0'
