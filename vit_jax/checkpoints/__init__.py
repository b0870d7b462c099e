"""Checkpoints: this project's orbax runs (`manager`), Google `.npz` files, and pretrained-weight
loading from any supported format.

  read_checkpoint(path) -> Checkpoint            readers.py  (a registry; orbax is one more entry)
  load_pretrained(path, init_params, ...)        pretrained.py (asks the family how to adapt)
  read_npz / write_npz                           npz.py
The orbax manager (`manager.py`) is imported only on use, so this package stays light.
"""
from __future__ import annotations

from vit_jax.checkpoints.npz import read_npz, write_npz
from vit_jax.checkpoints.pretrained import LoadReport, adapt_params, load_pretrained
from vit_jax.checkpoints.readers import Checkpoint, read_checkpoint, register_reader
from vit_jax.families.base import Architecture

__all__ = ['Architecture', 'Checkpoint', 'LoadReport', 'adapt_params', 'load_pretrained',
           'read_checkpoint', 'read_npz', 'register_reader', 'write_npz']
