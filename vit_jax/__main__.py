"""`python -m vit_jax COMMAND ...`: the `vit-jax` console command (vit_jax/commands.py)."""
from vit_jax import commands

if __name__ == '__main__':
  commands.entry()
