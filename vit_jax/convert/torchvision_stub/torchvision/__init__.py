"""Stand-in for torchvision where no build of it loads (none matches this machine's CPU torch).

It offers just enough for `import timm` and for building and running timm's models of the registered
families: `torchvision.ops.misc.FrozenBatchNorm2d`, `transforms.functional.InterpolationMode`, and
placeholder classes for the transforms and datasets timm names at import time. Never installed as
`torchvision`: `vit_jax.convert.torchvision_stub.import_timm` puts the parent folder on sys.path
only while timm imports, and only when torchvision itself cannot be imported.
"""
from torchvision import datasets, ops, transforms, utils  # noqa: F401

__version__ = '0.0.0+vit_jax_stub'
