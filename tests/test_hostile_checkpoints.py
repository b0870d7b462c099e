"""Hostile checkpoint files: truncated, bit-flipped and wrong-dtype `.npz`; `.safetensors` with a
bad or lying header; timm / Hugging Face directories whose config.json disagrees with the weights.
Each is a clear error naming the file and what is wrong, never silently different numbers. Nothing
in the package unpickles. A run's own (orbax) checkpoints: tests/test_hostile_resume.py. Counts to
$VIT_JAX_RELIABILITY_LOG (tests/reliability_log.py).
"""
from __future__ import annotations

import ast
import json
import pathlib
import shutil
import struct
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
import jax
import numpy as np
import pytest

from tests.reliability_log import record
from vit_jax.checkpoints import read_checkpoint
from vit_jax.checkpoints.npz import read_npz, write_npz
from vit_jax.families import registry
from vit_jax.families.base import Architecture
from vit_jax.formats import hf as hf_format, timm as timm_format
from vit_jax.models import params as params_lib

_QUIET = dict(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FAST, SLOW = settings(max_examples=15, **_QUIET), settings(max_examples=300, **_QUIET)
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Files:
  """A tiny ViT written as .npz, timm and HF under `root`; `flat`: its parameters."""

  def __init__(self, root: pathlib.Path):
    cfg = dict(registry.get_model_config('ViT-testing'))
    model = registry.create_model(cfg, 3)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
    rng = np.random.default_rng(0)  # random values of the right shapes: no model.init to compile
    self.root, self.flat = root, {
        k: rng.standard_normal(v.shape).astype(np.float32)
        for k, v in params_lib.flatten(shapes['params']).items()}
    arch = Architecture(cfg, 3, (16, 16), 3)
    write_npz(root / 'vit.npz', self.flat)
    timm_format.write_timm(root / 'timm', self.flat, arch, ['a', 'b', 'c'])
    hf_format.write_hf(root / 'hf', self.flat, arch, ['a', 'b', 'c'])

  def __iter__(self):
    return iter((self.root, self.flat))

  def __repr__(self) -> str:  # what hypothesis prints for a failing example
    return f'Files({self.root})'


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  return Files(tmp_path_factory.mktemp('ckpts'))


def fresh(tmp_path: pathlib.Path) -> pathlib.Path:
  """A new directory per hypothesis example (they share the test's tmp_path)."""
  return pathlib.Path(tempfile.mkdtemp(dir=tmp_path))


def damaged(path: pathlib.Path, data: bytes, name: str) -> pathlib.Path:
  out = path.parent / name
  out.write_bytes(data)
  return out


def flip(data: bytes, bit: int) -> bytes:
  b = bytearray(data)
  b[bit // 8] ^= 1 << (bit % 8)
  return bytes(b)


def same(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])
                                      for k in a)


# ------------------------------------------------------------------------------------------- npz

@FAST
@given(data=st.data())
def test_damaged_npz_is_an_error_naming_it_or_reads_identically(files, data):
  root, flat = files
  good = (root / 'vit.npz').read_bytes()
  kind = data.draw(st.sampled_from(['truncated', 'bitflip']))
  if kind == 'truncated':
    bad = good[:data.draw(st.integers(0, len(good) - 1))]
  else:
    bad = flip(good, data.draw(st.integers(0, 8 * len(good) - 1)))
  path = damaged(root / 'vit.npz', bad, 'damaged.npz')
  try:
    back, _ = read_npz(path)
  except ValueError as e:
    assert str(path) in str(e), e
    record('checkpoints', f'npz/{kind}', 'error')
    return
  # A flip in zip bookkeeping nothing reads (a timestamp): the arrays must be exactly the same.
  assert kind == 'bitflip' and same(back, flat)
  record('checkpoints', f'npz/{kind}', 'read')


@pytest.mark.slow
@SLOW
@given(bit=st.integers(0, 8 * 200_000))
def test_every_npz_bit_flip_is_caught_many(files, bit):
  root, flat = files
  good = (root / 'vit.npz').read_bytes()
  path = damaged(root / 'vit.npz', flip(good, bit % (8 * len(good))), 'flipped.npz')
  try:
    back, _ = read_npz(path)
  except ValueError as e:
    assert str(path) in str(e)
    record('checkpoints', 'npz/bitflip', 'error')
    return
  assert same(back, flat)
  record('checkpoints', 'npz/bitflip', 'read')


def test_npz_header_flip_that_still_parses_is_caught(files):
  """Shrinking a shape in an array's header parses fine and reads fewer bytes: only the CRC-32
  check (which numpy skips when it stops reading early) tells."""
  root, _ = files
  good = bytearray((root / 'vit.npz').read_bytes())
  at = good.index(b"'shape': (", good.index(b'embedding/kernel')) + len("'shape': (")
  good[at] = ord('1')  # (4, 4, 3, 32) -> (1, 4, 3, 32)
  path = damaged(root / 'vit.npz', bytes(good), 'shape.npz')
  with pytest.raises(ValueError, match=f"{path}: array 'embedding/kernel.npy' fails its CRC-32"):
    read_npz(path)
  record('checkpoints', 'npz/header-flip-that-parses', 'error')


@pytest.mark.parametrize('dtype', ['int32', 'bool', 'complex64', '<U3', 'V4', 'object'])
def test_npz_of_the_wrong_dtype_is_an_error_naming_it(files, tmp_path, dtype):
  _, flat = files
  bad = dict(flat)
  key = 'Transformer/encoder_norm/scale'
  shape = bad[key].shape
  bad[key] = (np.array([{'a': 1}] * shape[0], dtype=object) if dtype == 'object' else
              np.zeros(shape, dtype))
  path = tmp_path / f'{dtype.strip("<")}.npz'
  np.savez(path, **bad)
  want = 'pickled objects' if dtype == 'object' else rf'not floating point: {key} \('
  with pytest.raises(ValueError, match=want) as e:
    read_checkpoint(path)
  assert str(path) in str(e.value)
  record('checkpoints', f'npz/dtype-{dtype}', 'error')


# ----------------------------------------------------------------------------------- safetensors

def safetensors_cases(weights: bytes) -> dict[str, tuple[bytes, str]]:
  """name -> (bytes, the message it must give)."""
  (n,) = struct.unpack('<Q', weights[:8])
  header = json.loads(weights[8:8 + n])
  first = sorted(k for k in header if k != '__metadata__')[0]

  def with_header(h: dict, pad_to: int | None = None) -> bytes:
    raw = json.dumps(h).encode()
    raw += b' ' * ((pad_to or len(raw)) - len(raw))
    return struct.pack('<Q', len(raw)) + raw + weights[8 + n:]

  lying = dict(header)
  a, b = header[first]['data_offsets']
  lying[first] = {**header[first], 'data_offsets': [a, b + 10 ** 9]}
  return {
      'empty': (b'', 'shorter than the 8-byte header length'),
      'length-past-end': (struct.pack('<Q', len(weights)) + weights[8:], 'the header claims'),
      'length-huge': (struct.pack('<Q', 2 ** 62) + weights[8:], 'the header claims'),
      'not-json': (weights[:8] + b'#' * n + weights[8 + n:], 'the header is not JSON'),
      'json-list': (with_header([1, 2], n), 'not an object'),
      'bad-entry': (with_header({**header, first: {'dtype': 'F32'}}, n), 'malformed entry'),
      'bad-dtype': (with_header({**header, first: {**header[first], 'dtype': 'F33'}}, n),
                    'malformed entry'),
      'offsets-past-end': (with_header(lying, n), 'of data, but the file holds'),
      'truncated-data': (weights[:-7], 'of data, but the file holds'),
      # Bytes no tensor claims: only the library sees it; its error still names the file.
      'trailing-bytes': (weights + b'\0' * 16, 'not a valid .safetensors file: SafetensorError'),
  }


@pytest.mark.parametrize('where', ['file', 'timm-dir', 'hf-dir'])
def test_damaged_safetensors_is_an_error_naming_it(files, tmp_path, where):
  root, _ = files
  src = root / ('hf' if where == 'hf-dir' else 'timm')
  weights = (src / 'model.safetensors').read_bytes()
  for name, (data, message) in safetensors_cases(weights).items():
    target = tmp_path / f'{where}-{name}'
    shutil.copytree(src, target)
    (target / 'model.safetensors').write_bytes(data)
    path = target / 'model.safetensors' if where == 'file' else target
    with pytest.raises(ValueError, match=message) as e:
      read_checkpoint(path)
    assert str(target / 'model.safetensors') in str(e.value), (name, e.value)
    record('checkpoints', f'safetensors/{name}', 'error')


@FAST
@given(data=st.data())
def test_any_safetensors_damage_is_an_error_or_reads_identically(files, tmp_path, data):
  root, _ = files
  weights = (root / 'timm' / 'model.safetensors').read_bytes()
  (n,) = struct.unpack('<Q', weights[:8])
  kind = data.draw(st.sampled_from(['truncated', 'header-bitflip']))
  if kind == 'truncated':
    bad = weights[:data.draw(st.integers(0, len(weights) - 1))]
  else:  # the data itself carries no checksum in this format: flips there cannot be seen
    bad = flip(weights, data.draw(st.integers(0, 8 * (8 + n) - 1)))
  target = fresh(tmp_path) / 'timm'
  shutil.copytree(root / 'timm', target)
  (target / 'model.safetensors').write_bytes(bad)
  want = read_checkpoint(root / 'timm').params
  try:
    got = read_checkpoint(target).params
  except ValueError as e:
    assert str(target) in str(e), e
    record('checkpoints', f'safetensors/{kind}', 'error')
    return
  assert kind == 'header-bitflip' and same(got, want)  # e.g. a flip inside '__metadata__'
  record('checkpoints', f'safetensors/{kind}', 'read')


# ----------------------------------------------------------------------- timm / HF config.json

TIMM_EDITS = {'embed_dim': 64, 'depth': 3, 'num_classes': 5, 'patch_size': 8, 'in_chans': 1,
              'mlp_ratio': 4.0}
HF_EDITS = {'hidden_size': 64, 'num_hidden_layers': 1, 'intermediate_size': 128, 'patch_size': 8,
            'num_channels': 1, 'id2label': {'0': 'a', '1': 'b'}}


@pytest.mark.parametrize('kind,key', [('timm', k) for k in TIMM_EDITS] + [
    ('timm', 'label_names'), ('timm', 'not-json')] + [('hf', k) for k in HF_EDITS] + [
    ('hf', 'not-json')])
def test_config_json_that_disagrees_with_the_weights_is_an_error(files, tmp_path, kind, key):
  root, _ = files
  target = tmp_path / kind
  shutil.copytree(root / kind, target)
  config_path = target / 'config.json'
  config = json.loads(config_path.read_text())
  if key == 'not-json':
    config_path.write_text(json.dumps(config)[:-20])
    message = 'is not valid JSON'
  else:
    if kind == 'timm' and key == 'label_names':
      config['label_names'] = ['a', 'b']
    elif kind == 'timm':
      config['model_args'][key] = TIMM_EDITS[key]
    else:
      config[key] = HF_EDITS[key]
    config_path.write_text(json.dumps(config))
    message = {'label_names': '2 label_names', 'id2label': '2 classes in id2label',
               'num_channels': 'num_channels=1'}.get(key, f'says {key}=')
  with pytest.raises(ValueError, match=message) as e:
    read_checkpoint(target)
  assert str(config_path) in str(e.value), e.value
  record('checkpoints', f'{kind}-config/{key}', 'error')


# ------------------------------------------------------------------------------- no unpickling

UNPICKLERS = {'pickle', '_pickle', 'cPickle', 'cloudpickle', 'dill', 'joblib', 'shelve', 'marshal'}


def unpickling(source: str) -> list[str]:
  """What in `source` could unpickle: imports of pickling modules, `allow_pickle` not literally
  False, `torch.load` without `weights_only=True`, `read_pickle`. Strings and comments ignored."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + [getattr(node, 'module', None) or '']
      found += [f'line {node.lineno}: imports {n}' for n in names if n.split('.')[0] in UNPICKLERS]
    elif isinstance(node, ast.Name) and node.id in UNPICKLERS:
      found.append(f'line {node.lineno}: uses {node.id}')
    elif isinstance(node, ast.Call):
      func = ast.unparse(node.func)
      kw = {k.arg: k.value for k in node.keywords}
      literal = lambda k, v: k in kw and isinstance(kw[k], ast.Constant) and kw[k].value is v
      if 'allow_pickle' in kw and not literal('allow_pickle', False):
        found.append(f'line {node.lineno}: {func}(allow_pickle=...)')
      if func.split('.')[-1] == 'load' and 'torch' in func and not literal('weights_only', True):
        found.append(f'line {node.lineno}: {func} without weights_only=True')
      if func.split('.')[-1] in ('read_pickle', 'from_pickle'):
        found.append(f'line {node.lineno}: {func}')
  return found


def test_the_scanner_finds_every_way_to_unpickle():
  for bad in ('import pickle', 'from joblib import load', 'import dill as d',
              'np.load(f, allow_pickle=True)', 'np.load(f, allow_pickle=flag)', 'torch.load(p)',
              'torch.load(p, weights_only=False)', 'pd.read_pickle(p)', 'x = pickle.loads(b)'):
    assert unpickling(bad), bad
  for fine in ('np.load(f, allow_pickle=False)', 'torch.load(p, weights_only=True)',
               '"""never unpickled: no pickle.loads here"""', '# import pickle'):
    assert not unpickling(fine), fine


def test_nothing_in_the_package_unpickles():
  sources = sorted((ROOT / 'vit_jax').rglob('*.py')) + sorted((ROOT / 'scripts').rglob('*.py'))
  assert len(sources) > 30
  found = {str(p.relative_to(ROOT)): f for p in sources if (f := unpickling(p.read_text()))}
  assert not found, found
  record('checkpoints', 'source-scan/no-unpickling', 'read')
