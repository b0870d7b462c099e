"""Export to and import from other ViT implementations: timm, Hugging Face, Google's `.npz`.

Writing needs only numpy and safetensors; torch is imported lazily, only to `--verify`.
  convert(input, to, output, ...)            api.py   (`python -m vit_jax.convert`)
  to_timm / from_timm / write_timm / read_timm   timm.py
  to_hf / from_hf / write_hf / read_hf           hf.py
  verify_export(target, out_dir, flat, arch)     verify.py (torch)
"""
from __future__ import annotations

from vit_jax.convert.api import WRITERS, ConvertResult, convert, resolve_architecture

__all__ = ['WRITERS', 'ConvertResult', 'convert', 'resolve_architecture']
