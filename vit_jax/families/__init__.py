"""Model families: per family one descriptor (`base.Family`, `<family>.py`) and one interop
(`interop.Interop`, `<family>_interop.py`), paired and collected by `registry`.

Import `vit_jax.families.registry` to use them. `base` is a leaf module (numpy and
`vit_jax.shapes`) that other packages may import for `Architecture`; interop modules import their
descriptor, never the reverse (tests/test_layering.py).
"""
