"""Placeholders for the torchvision names timm imports but a ViT forward pass never calls."""
from __future__ import annotations


def placeholder_getattr(module_name: str):
  """A module `__getattr__` that answers any public name with a class that cannot be instantiated.

  timm subclasses some torchvision transforms at import time, so the names must be real classes;
  calling one fails loudly instead of silently doing nothing.
  """
  def __getattr__(name: str):
    if name.startswith('__'):
      raise AttributeError(name)

    def _unavailable(self, *args, **kwargs):
      raise NotImplementedError(
          f'{module_name}.{name} is not available: timm was imported through vit_jax\'s stand-in '
          'for torchvision (vit_jax/convert/torchvision_stub), as no torchvision build loads here')

    return type(name, (), {'__init__': _unavailable, '__module__': module_name})
  return __getattr__
