"""Test-only stand-in for torchvision (no CPU build of it loads here).

It offers just enough for `import timm` and for building and running timm's `VisionTransformer`:
`torchvision.ops.misc.FrozenBatchNorm2d`, `transforms.functional.InterpolationMode`, and placeholder
classes for the transforms and datasets timm names at import time. Tests that import timm put the
parent folder on sys.path; the library never does.
"""
from torchvision import datasets, ops, transforms, utils  # noqa: F401

__version__ = '0.0.0+vit_jax_test_stub'
