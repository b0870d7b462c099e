"""The PyTorch side of the interop tests (torch, timm, transformers): imported here, once.

Where one cannot be imported, the tests that need it skip, except when VIT_JAX_REQUIRE_INTEROP=1
(`scripts/test.sh` sets it): there a missing torch, timm, transformers or torchvision stand-in is a
failure, so that the logit comparisons against timm and Hugging Face cannot silently stop running.
Works at module level (a module of interop tests) and inside a test or fixture.
"""
from __future__ import annotations

import importlib
import os

import pytest

ENV = 'VIT_JAX_REQUIRE_INTEROP'


def required() -> bool:
  """Whether a missing interop library fails (VIT_JAX_REQUIRE_INTEROP=1) instead of skipping."""
  return os.environ.get(ENV, '') == '1'


def _unavailable(what: str, error: BaseException):
  message = f'{what} cannot be imported here: {type(error).__name__}: {error}'
  if required():
    pytest.fail(f'{message}. {ENV}=1 (scripts/test.sh) makes this a failure, not a skip: install '
                'requirements-dev.txt into the venv', pytrace=False)
  pytest.skip(message, allow_module_level=True)


def require(name: str):
  """The module `name` (e.g. 'torch', 'transformers'), or a skip / failure as above."""
  try:
    return importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  return _unavailable(name, error)


def require_timm():
  """(torch, timm), timm imported through vit_jax/convert/torchvision_stub where torchvision
  cannot load;
  or a skip / failure as above."""
  torch = require('torch')
  try:
    from vit_jax.convert.torchvision_stub import import_timm  # pylint: disable=g-import-not-at-top
    return torch, import_timm()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  return _unavailable('timm (even through vit_jax/convert/torchvision_stub)', error)
