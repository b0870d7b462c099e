"""`torchvision.datasets` stand-in: placeholder classes only."""
from torchvision._placeholder import placeholder_getattr

__getattr__ = placeholder_getattr('torchvision.datasets')
