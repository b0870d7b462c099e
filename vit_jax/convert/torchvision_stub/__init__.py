"""timm without a working torchvision: a stand-in for the few torchvision names timm imports.

timm declares torchvision as a dependency and imports it at start, but its models of the registered
families never call it. Where no torchvision build loads (one built for another torch: on a machine
whose torch is a local CPU wheel, PyPI's torchvision fails with "operator torchvision::nms does not
exist"), `import_timm()` puts this folder on sys.path just long enough to import timm, then takes
the stand-in back out (sys.path and sys.modules), so that other libraries (transformers checks for
torchvision and would then import parts of it) never see it. timm keeps the names it bound at
import time. Where torchvision imports, timm is imported plainly and the stand-in is not used.
"""
from __future__ import annotations

import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _drop_torchvision_modules() -> None:
  for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
    del sys.modules[name]


def torchvision_loads() -> bool:
  """Whether a real torchvision is installed and imports (one built for another torch does not)."""
  if importlib.util.find_spec('torchvision') is None:
    return False
  try:
    import torchvision  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except Exception:  # pylint: disable=broad-except
    _drop_torchvision_modules()
    return False


def import_timm():
  """Returns the timm module, importing it through the stand-in when torchvision does not load.

  Raises ImportError when torch or timm is missing or timm still cannot import.
  """
  if sys.modules.get('timm') is not None:
    return sys.modules['timm']
  import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if importlib.util.find_spec('timm') is None:
    raise ImportError('timm is not installed: pip install --no-deps "timm>=1.0.31,<1.1" (its '
                      'torchvision dependency is optional here), or pip install "vit_jax[timm]" '
                      'where a torchvision build for your torch exists')
  if torchvision_loads():
    import timm  # pylint: disable=import-outside-toplevel
    return timm
  sys.path.insert(0, HERE)
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import timm.data  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  finally:
    sys.path.remove(HERE)
    _drop_torchvision_modules()
  return timm
