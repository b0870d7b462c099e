"""A test-only stand-in for torchvision, so that timm imports on a machine with no torchvision build.

`import_timm()` puts this folder on sys.path just long enough to import timm, then takes the stand-in
back out (sys.path and sys.modules), so that other libraries (transformers checks for torchvision
and would then import parts of it) never see it. timm keeps the names it bound at import time.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def import_timm():
  """Returns the timm module, importing it through the stand-in when torchvision is absent.

  Raises ImportError (callers skip) when torch or timm is missing or timm still cannot import.
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  if sys.modules.get('timm') is not None:
    return sys.modules['timm']
  import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if importlib.util.find_spec('torchvision') is not None:
    import timm  # pylint: disable=import-outside-toplevel
    return timm
  sys.path.insert(0, HERE)
  try:
    import timm  # pylint: disable=import-outside-toplevel
    import timm.data  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  finally:
    sys.path.remove(HERE)
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
  return timm
