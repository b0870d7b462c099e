"""`torchvision.transforms` stand-in: placeholder classes (timm subclasses some at import time)."""
from torchvision._placeholder import placeholder_getattr
from torchvision.transforms import functional  # noqa: F401
from torchvision.transforms.functional import InterpolationMode  # noqa: F401

__getattr__ = placeholder_getattr('torchvision.transforms')
