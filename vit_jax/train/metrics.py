"""Where a run's numbers go: workdir/metrics.jsonl, TensorBoard event files and a console progress bar.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time
from typing import Any, Optional

import numpy as np


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, 'dtype'):
    v = np.asarray(v).item()
  return v


def _summary_writer() -> type:
  """tensorboardX's SummaryWriter, imported without torch: its writer module imports torch when
  it can (only to accept torch tensors), which costs a training start several seconds (12 s on the
  loaded 2-core machine) and breaks the rule that the training path imports no torch. A torch
  already imported is left alone."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError, which tensorboardX expects
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Appends one JSON object per call to `workdir/metrics.jsonl` and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb_dir = os.path.join(workdir, 'tensorboard')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._tb = _summary_writer()(self.tb_dir, flush_secs=30)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in values.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      try:
        self._tb.flush()
        self._tb.close()
      except OSError as e:  # a full disk: warn, so that the run reports its own error (if any)
        if e.errno != errno.ENOSPC:
          raise
        logging.warning('TensorBoard events in %s not written: %s', self.tb_dir, e)


class ProgressBar:
  """One console line: step/total, a bar, loss, images/s and the ETA. Redrawn at most every 0.5 s."""

  def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=sys.stderr):
    self.total, self.enabled, self.stream = total, enabled and total > 0, stream
    self._t0, self._s0, self._last = time.time(), start, 0.0
    self._interactive = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, step: int, loss: Optional[float], img_per_s: Optional[float],
             force: bool = False) -> None:
    now = time.time()
    if not self.enabled or (not force and now - self._last < (0.5 if self._interactive else 30)):
      return
    self._last = now
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    eta_s = time.strftime('%M:%S', time.gmtime(eta)) if eta < 3600 else f'{eta / 3600:.1f}h'
    width = 24
    done = int(width * step / self.total)
    line = (f'step {step:>{len(str(self.total))}}/{self.total} [{"#" * done}{"." * (width - done)}] '
            f'loss {"-" if loss is None else f"{loss:.4f}":>6}  '
            f'{img_per_s or 0:,.0f} img/s  ETA {eta_s}')
    if self._interactive:
      self.stream.write('\r' + line + ' ' * 4)
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self._interactive:
      self.stream.write('\n')
      self.stream.flush()
