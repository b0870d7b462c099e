"""Export to and import from other implementations: timm, Hugging Face, Google's `.npz`, orbax.

Writing needs only numpy and safetensors; torch is imported lazily, only to `--verify`.
  convert(input, to, output, ...)                 api.py   (`python -m vit_jax.convert`)
  write_timm / read_timm, write_hf / read_hf       vit_jax/formats (the families own the key maps)
  verify_export(target, out_dir, flat, arch)      verify.py (torch)
"""
from __future__ import annotations

from vit_jax.convert.api import WRITERS, ConvertResult, convert, resolve_architecture

__all__ = ['WRITERS', 'ConvertResult', 'convert', 'resolve_architecture']
