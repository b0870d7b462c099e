"""Checkpoints: pretrained-weight loading (Google `.npz`, timm, Hugging Face, orbax via `manager`),
position-embedding resampling and architecture inference.

  read_checkpoint(path) -> Checkpoint            readers.py  (a registry; orbax is one more entry)
  load_pretrained(path, init_params, ...)        pretrained.py
  resample_posemb(posemb, new_grid, ...)         posemb.py
  read_npz / write_npz                           npz.py
  infer_architecture(flat, ...) -> Architecture  arch.py
The orbax manager (`manager.py`) is imported only on use, so this package stays light.
"""
from __future__ import annotations

from vit_jax.checkpoints.arch import Architecture, infer_architecture
from vit_jax.checkpoints.npz import read_npz, write_npz
from vit_jax.checkpoints.posemb import resample_posemb
from vit_jax.checkpoints.pretrained import LoadReport, adapt_params, load_pretrained
from vit_jax.checkpoints.readers import Checkpoint, read_checkpoint, register_reader

__all__ = ['Architecture', 'Checkpoint', 'LoadReport', 'adapt_params', 'infer_architecture',
           'load_pretrained', 'read_checkpoint', 'read_npz', 'register_reader', 'resample_posemb',
           'write_npz']
