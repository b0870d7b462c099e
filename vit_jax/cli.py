"""The one convention of every `python -m vit_jax.*` command (also run as `vit-jax NAME`,
vit_jax/commands.py) but `main` (whose flags are the config's).

  --key value or --key=value flags (argparse); sizes as `--image_size H` or `--image_size H,W`;
  `--model NAME` always a registered model name; a bad input prints `error: ...` on stderr and exits
  with 2, a failure of the work itself (an unreadable image, a failed verification) with 1.
Each command builds its parser with `parser()`, adds the shared flags with the helpers below, and
runs its body through `run()`, which turns the library's ValueError / FileNotFoundError /
KeyError into that message and exit status.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

USAGE_ERRORS = (ValueError, FileNotFoundError, KeyError, NotImplementedError, ImportError)


# `vit-jax NAME` (vit_jax.commands) runs module `prog` under that name: {prog: 'vit-jax NAME'}.
COMMAND_NAMES: dict[str, str] = {}


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """The parser of `python -m prog` (or `vit-jax NAME`, whose usage and description then name it
  so); doc: the module's docstring, shown as the description."""
  shown = f'python -m {prog}'
  if prog in COMMAND_NAMES:
    shown, doc = COMMAND_NAMES[prog], doc.replace(shown, COMMAND_NAMES[prog])
  return argparse.ArgumentParser(prog=shown, description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def image_size(value: str) -> tuple[int, int]:
  """'224' or '224,160' -> (h, w)."""
  parts = [int(v) for v in str(value).replace('x', ',').split(',') if v.strip()]
  if len(parts) not in (1, 2) or min(parts) <= 0:
    raise argparse.ArgumentTypeError(f'image size {value!r}: use H or H,W (positive pixels)')
  return (parts[0], parts[-1])


def add_model(p: argparse.ArgumentParser, required: bool = False, default: Optional[str] = None,
              help_text: str = 'registered model name (python -m vit_jax.summary --model list)'):
  p.add_argument('--model', required=required, default=default, help=help_text)


def add_image_size(p: argparse.ArgumentParser, default: Optional[str] = None,
                   help_text: str = "the model's input size: H or H,W pixels"):
  p.add_argument('--image_size', type=image_size, default=image_size(default) if default else None,
                 help=help_text)


def fail(error: Exception) -> int:
  """Prints `error: ...` for a library error and returns exit status 2."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  print(f'error: {message}', file=sys.stderr)
  return 2


def run(body: Callable[[], int]) -> int:
  """Runs a command's body; library errors become `error: ...` and exit status 2."""
  try:
    return body()
  except USAGE_ERRORS as e:
    return fail(e)


def main_entry(main: Callable[[Optional[Sequence[str]]], int]) -> None:
  sys.exit(main(sys.argv[1:]))
