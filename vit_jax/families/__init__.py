"""Model families: one descriptor per family (`base.Family`), collected by `registry`.

Import `vit_jax.families.registry` to use them; `base` is a leaf module (numpy only) that other
packages may import for `Architecture` and `hw`.
"""
