"""`torchvision.utils` stand-in: placeholders only."""
from torchvision._placeholder import placeholder_getattr

__getattr__ = placeholder_getattr('torchvision.utils')
