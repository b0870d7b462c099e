"""Few-shot evaluation of a model's pre-logits features: ridge regression (big_vision's
`fewshot_lsr`), and k-NN. Read top to bottom:

  1. closed forms on the host (NumPy, float64): `ridge_fit` / `ridge_scores`, `knn_scores`
  2. shots: `sample_shots` draws exactly k training examples per class from a seed
  3. features: `make_features_fn` (jitted and sharded like the eval step) and `extract_features`
  4. the protocol: `FewshotTask` (one dataset: shots, seeds, accuracy on the full test split),
     `evaluate_checkpoint` (the `python -m vit_jax.fewshot` library call) and `TrainingEvaluator`
     (`config.fewshot` inside the training loop)

The ridge regression *is* the linear probe: a linear classifier on frozen features fitted in
closed form (least squares to ±1 targets), not by gradient descent on a cross-entropy.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import data
from vit_jax import sharding as sharding_lib
from vit_jax.data.sources import ArraySource, Source
from vit_jax.models import params as params_lib

METHODS = ('ridge', 'knn')
L2_REG = 2.0 ** 10       # big_vision's default ridge strength
BIAS_FEATURE = 100.0     # constant feature for the bias: its weight's penalty is l2 / 100^2
STD_EPS = 1e-5           # added to the per-feature std when whitening (a constant feature stays 0)
K_NEIGHBOURS = 20
KNN_TEMPERATURE = 0.07   # vote weight exp(cos / T) (Wu et al. 2018; DINO's weighted k-NN)
SHOTS = (1, 5, 10, 25)


# ---------------------------------------------------------------------------------- 1. closed forms

@dataclasses.dataclass
class Ridge:
  """A fitted ridge classifier: features are whitened with the shots' `mean` and `std` [D], a
  constant BIAS_FEATURE is appended, and scores = [z, 100] @ `weights` [D + 1, K]."""
  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray

  def design(self, x: np.ndarray) -> np.ndarray:
    """[N, D] features -> [N, D + 1] whitened features with the bias column."""
    z = (np.asarray(x, np.float64) - self.mean) / self.std
    return np.concatenate([z, np.full((len(z), 1), BIAS_FEATURE)], axis=1)


def ridge_fit(x: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float = L2_REG) -> Ridge:
  """Closed-form L2-regularised least squares from features x [N, D] to ±1 one-hot targets.

  W = argmin |Z W - Y|^2 + l2_reg |W|^2 with Z the whitened features plus a constant column of 100
  (so the bias is penalised 10^4 times less than the other weights) and Y = 2 onehot - 1 [N, K].
  Solved as (Z^T Z + l2 I)^-1 Z^T Y when N >= D + 1, else as Z^T (Z Z^T + l2 I)^-1 Y (the same W
  from an N x N system: few shots, wide features), in float64.
  """
  if l2_reg <= 0:
    raise ValueError(f'l2_reg must be > 0 (the few-shot systems are singular without it), '
                     f'got {l2_reg}')
  x = np.asarray(x, np.float64)
  labels = np.asarray(labels)
  model = Ridge(x.mean(axis=0), x.std(axis=0) + STD_EPS, np.zeros(()))
  z = model.design(x)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0
  n, d = z.shape
  if n >= d:
    model.weights = np.linalg.solve(z.T @ z + l2_reg * np.eye(d), z.T @ y)
  else:
    model.weights = z.T @ np.linalg.solve(z @ z.T + l2_reg * np.eye(n), y)
  return model


def ridge_scores(model: Ridge, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
  """Class scores [N, K] (float64) of features x [N, D]; argmax is the prediction."""
  out = [model.design(x[i:i + chunk]) @ model.weights for i in range(0, len(x), chunk)]
  return np.concatenate(out) if out else np.zeros((0, model.weights.shape[1]))


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_scores(train_x: np.ndarray, train_labels: np.ndarray, x: np.ndarray, num_classes: int,
               k: int = K_NEIGHBOURS, temperature: float = KNN_TEMPERATURE,
               chunk: int = 1024) -> np.ndarray:
  """Weighted k-NN votes [N, K] for features x [N, D] against train_x [M, D].

  Features are L2-normalised; the k most cosine-similar training examples (all M when M < k) each
  add exp(cos / temperature) to their class. With k >= M and one shot per class this is the
  nearest neighbour; a plain majority vote would instead tie every class.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  a, labels = _unit(train_x), np.asarray(train_labels)
  k = min(k, len(a))
  out = []
  for i in range(0, len(x), chunk):
    sim = _unit(x[i:i + chunk]) @ a.T                            # [n, M]
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]            # [n, k], unordered
    votes = np.exp((np.take_along_axis(sim, top, axis=1) - 1.0) / temperature)  # <= 1: no overflow
    scores = np.zeros((len(sim), num_classes))
    np.add.at(scores, (np.arange(len(sim))[:, None], labels[top]), votes)
    out.append(scores)
  return np.concatenate(out) if out else np.zeros((0, num_classes))


def accuracy(method: str, train_x: np.ndarray, train_labels: np.ndarray, test_x: np.ndarray,
             test_labels: np.ndarray, num_classes: int, *, l2_reg: float = L2_REG,
             k: int = K_NEIGHBOURS) -> float:
  """Top-1 accuracy in [0, 1] on (test_x, test_labels) of `method` fitted to the training shots."""
  if method == 'ridge':
    scores = ridge_scores(ridge_fit(train_x, train_labels, num_classes, l2_reg), test_x)
  elif method == 'knn':
    scores = knn_scores(train_x, train_labels, test_x, num_classes, k)
  else:
    raise ValueError(f'method {method!r} is not one of {METHODS}')
  return float(np.mean(np.argmax(scores, axis=1) == np.asarray(test_labels)))


# ---------------------------------------------------------------------------------------- 2. shots

def sample_shots(labels: np.ndarray, num_classes: int, shots: Sequence[int], seed: int,
                 class_names: Optional[Sequence[str]] = None) -> dict[int, np.ndarray]:
  """{k: indices [num_classes * k]} into `labels`: exactly k examples of each class, class-major.

  One random order per class is drawn from `seed` (classes in order), and k-shot takes its first k:
  the 5-shot set contains the 1-shot set, and a seed gives the same draw whatever shots are asked.
  """
  labels = np.asarray(labels)
  shots = sorted({int(s) for s in shots})
  if not shots or shots[0] < 1:
    raise ValueError(f'shots must be positive integers, got {shots}')
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  c = int(np.argmin(counts))
  if counts[c] < shots[-1]:  # name the smallest class: its size is the most one can ask for
    name = f' ({class_names[c]!r})' if class_names else ''
    raise ValueError(f'class {c}{name} has {counts[c]} training example(s), fewer than '
                     f'{shots[-1]} shots: ask for at most {counts[c]} shots')
  rng = np.random.default_rng(seed)
  orders = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return {k: np.concatenate([o[:k] for o in orders]) for k in shots}


def source_labels(source: Source) -> np.ndarray:
  """int64 [N] labels of a source (read one by one, decoding images, if it keeps no array)."""
  labels = getattr(source, 'labels', None)
  if labels is None:
    labels = [source[i]['label'] for i in range(len(source))]
  return np.asarray(labels, np.int64)


class _Subset(Source):
  """Examples `indices` of `source`, in that order."""

  def __init__(self, source: Source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices)
    self.name, self.num_classes = f'{source.name}[shots]', source.num_classes
    self.class_names = source.class_names
    self.labels = source_labels(source)[self.indices] if hasattr(source, 'labels') else None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[int(self.indices[index])]


def subset(source: Source, indices: np.ndarray) -> Source:
  if isinstance(source, ArraySource):
    return source.subset(indices, name=f'{source.name}[shots]')
  return _Subset(source, indices)


# ------------------------------------------------------------------------------------- 3. features

def without_head(params: Any, head_prefixes: Sequence[str]) -> Any:
  """The parameter tree without the classifier head(s) (paths starting with a head prefix)."""
  flat = params_lib.flatten(params)
  return params_lib.unflatten({k: v for k, v in flat.items()
                               if not any(k.startswith(p) for p in head_prefixes)})


def make_features_fn(model, mesh, params_shardings: Any, *, head_prefixes: Sequence[str],
                     input_fn: Optional[Callable[[jax.Array], jax.Array]] = None) -> Callable:
  """features(params, batch) -> (pre-logits float32 [B, D], label [B], mask [B]), all replicated.

  `params` is the model's full tree (with its head, sharded as `params_shardings`, as the eval
  step takes it); the head is dropped and the same module without a head (num_classes=None)
  returns its pooled pre-logits features: the class token or pooled tokens after the final norm
  and the optional pre-logits layer. `input_fn` maps the loader's [-1, 1] images to what the model
  expects (another mean/std). Jitted with the eval step's shardings: batches split over
  ('data', 'fsdp'), outputs gathered to every device so every process can read them.
  """
  headless = model.clone(num_classes=None)
  batch_sharding = sharding_lib.batch_sharding(mesh)

  def features(params, batch):
    images = batch['image'] if input_fn is None else input_fn(batch['image'])
    out = headless.apply({'params': without_head(params, head_prefixes)}, images, train=False)
    return out.astype(jnp.float32), batch['label'], batch['mask']

  shardings = {'image': batch_sharding, 'label': batch_sharding, 'mask': batch_sharding}
  return jax.jit(features, in_shardings=(params_shardings, shardings),
                 out_shardings=sharding_lib.replicated(mesh))


def extract_features(features_fn: Callable, params: Any, source: Source, *, image_size: Any,
                     channels: int, batch_size: int,
                     sharding=None) -> tuple[np.ndarray, np.ndarray]:
  """(features float32 [N, D], labels int64 [N]) of every example of `source`, in order; images
  are resized to `image_size` and converted to `channels` as the evaluation split is."""
  it = data.eval_batches(source, image_size=image_size, channels=channels,
                         global_batch_size=batch_size, sharding=sharding)
  feats, labels = [], []
  try:
    for batch in it:
      f, y, m = jax.device_get(features_fn(params, batch))
      m = np.asarray(m, bool)
      feats.append(np.asarray(f)[m])
      labels.append(np.asarray(y)[m])
  finally:
    it.close()
  if it.skipped_images:
    raise ValueError(f'{it.skipped_images} unreadable image(s) in {source.name}: few-shot '
                     'accuracy needs every example; remove them')
  return np.concatenate(feats), np.concatenate(labels).astype(np.int64)


# ------------------------------------------------------------------------------------- 4. protocol

Extract = Callable[[Source], tuple[np.ndarray, np.ndarray]]


class FewshotTask:
  """One dataset: the training shots of every seed, and the full test split.

  Seeds are 0 .. seeds-1 (`sample_shots`). Only the examples some seed draws are featurised,
  never the whole training split.
  """

  def __init__(self, dataset: str, *, shots: Sequence[int] = SHOTS, seeds: int = 3,
               data_dir: Optional[str] = None, held_out: Optional[float] = None,
               split_seed: int = 0, train_split: str = 'train', test_split: str = 'test'):
    if seeds < 1:
      raise ValueError(f'seeds must be >= 1, got {seeds}')
    kw = dict(data_dir=data_dir, held_out=held_out, seed=split_seed)
    train = data.get_source(dataset, split=train_split, **kw)
    self.test = data.get_source(dataset, split=test_split, **kw)
    self.name, self.num_classes, self.shots = dataset, train.num_classes, sorted(set(shots))
    labels = source_labels(train)
    draws = [sample_shots(labels, self.num_classes, self.shots, s, train.class_names)
             for s in range(seeds)]
    self.needed = np.unique(np.concatenate([d[self.shots[-1]] for d in draws]))
    # (seed, k) -> positions into `needed` (whose features are computed once).
    self.picks = {(s, k): np.searchsorted(self.needed, idx)
                  for s, d in enumerate(draws) for k, idx in d.items()}
    self.train = subset(train, self.needed)
    self.seeds = seeds

  def run(self, extract: Extract, method: str = 'ridge', l2_reg: float = L2_REG,
          k: int = K_NEIGHBOURS) -> dict[int, np.ndarray]:
    """{shots: accuracies [seeds]} with features from `extract(source)`."""
    train_x, train_y = extract(self.train)
    test_x, test_y = extract(self.test)
    out = {}
    for shots in self.shots:
      out[shots] = np.array([
          accuracy(method, train_x[self.picks[s, shots]], train_y[self.picks[s, shots]], test_x,
                   test_y, self.num_classes, l2_reg=l2_reg, k=k) for s in range(self.seeds)])
    return out


def input_fn_for(arch) -> Optional[Callable[[jax.Array], jax.Array]]:
  """[-1, 1] loader images -> the checkpoint's normalisation (None when it is [-1, 1] already)."""
  # The adapter a distillation teacher's input goes through, here at the checkpoint's own size.
  from vit_jax.objectives.distill import teacher_input_fn  # pylint: disable=import-outside-toplevel
  if np.allclose(arch.mean, 0.5) and np.allclose(arch.std, 0.5):
    return None
  return teacher_input_fn(arch.image_size, arch.channels, arch.image_size, arch.channels,
                          arch.mean, arch.std)


def evaluate_checkpoint(arch, params: Any, task: FewshotTask, *, method: str = 'ridge',
                        l2_reg: float = L2_REG, k: int = K_NEIGHBOURS,
                        batch_size: int = 256) -> dict[int, np.ndarray]:
  """Few-shot accuracies {shots: [seeds]} of a model (an `Architecture` and its module-layout
  params) on `task`, data parallel over every device (parameters replicated)."""
  mesh = sharding_lib.make_mesh((('data', -1),))
  batch_size = -(-batch_size // mesh.size) * mesh.size  # a multiple of the device count
  replicated = sharding_lib.replicated(mesh)
  params = jax.device_put(params, replicated)
  fn = make_features_fn(arch.create_model(), mesh, jax.tree.map(lambda _: replicated, params),
                        head_prefixes=arch.get_family().head_prefixes, input_fn=input_fn_for(arch))
  extract = lambda src: extract_features(fn, params, src, image_size=arch.image_size,
                                         channels=arch.channels, batch_size=batch_size,
                                         sharding=sharding_lib.batch_sharding(mesh))
  return task.run(extract, method, l2_reg, k)


def random_params(arch, seed: int = 0) -> Any:
  """A fresh initialisation of `arch` (the baseline few-shot features are compared against)."""
  model = arch.create_model()
  x = jnp.zeros((1, *arch.image_size, arch.channels), jnp.float32)
  return jax.device_get(jax.jit(lambda: model.init(jax.random.PRNGKey(seed), x)['params'])())


def metric_name(dataset: str) -> str:
  """A dataset as a metric-key component: a folder by its base name, no '/' or ':'."""
  name = dataset[len('folder:'):] if dataset.startswith('folder:') else dataset
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(name.rstrip('/')) or name)


def datasets_of(value: Any) -> list[str]:
  """'a,b', ('a', 'b') or ('a,b',) -> ['a', 'b'] (command-line overrides give any of these)."""
  items = [value] if isinstance(value, str) else list(value or ())
  return [d.strip() for item in items for d in str(item).split(',') if d.strip()]


class TrainingEvaluator:
  """`config.fewshot` during training: `evaluator(params)` -> {'fewshot/<dataset>/<k>shot': mean
  accuracy over seeds, 'fewshot/seconds': wall time}.

  Reads nothing but `params` (the eval step's tree and shardings) and draws shots from its own
  seeded generators: the training state and its random streams are untouched. Test features are
  recomputed each time (the parameters change); the shot draws and sources are made once.
  """

  def __init__(self, config, model, mesh, params_shardings, head_prefixes: Sequence[str]):
    fs = config.fewshot
    self.every = int(fs.every)
    self.method, self.l2_reg, self.k = fs.method, float(fs.l2_reg), int(fs.k)
    self.image_size, self.channels = config.image_size, config.channels
    self.batch_size = int(config.eval_batch_size or config.batch_size)
    self.sharding = sharding_lib.batch_sharding(mesh)
    shots = fs.shots if isinstance(fs.shots, (tuple, list)) else (fs.shots,)
    self.tasks = []
    for d in datasets_of(fs.datasets):
      # The run's own dataset is read as the run reads it (same folder, same held-out split).
      own = d == config.dataset
      data_dir = fs.data_dir if fs.data_dir is not None else (config.data_dir if own else None)
      self.tasks.append(FewshotTask(d, shots=shots, seeds=int(fs.seeds), data_dir=data_dir,
                                    held_out=config.held_out if own else None,
                                    split_seed=config.seed if own else 0))
    self.features_fn = make_features_fn(model, mesh, params_shardings, head_prefixes=head_prefixes)

  def __call__(self, params: Any) -> dict[str, float]:
    t0 = time.time()
    extract = lambda src: extract_features(self.features_fn, params, src,
                                           image_size=self.image_size, channels=self.channels,
                                           batch_size=self.batch_size, sharding=self.sharding)
    row = {}
    for task in self.tasks:
      for shots, accs in task.run(extract, self.method, self.l2_reg, self.k).items():
        row[f'fewshot/{metric_name(task.name)}/{shots}shot'] = float(np.mean(accs))
    row['fewshot/seconds'] = time.time() - t0
    return row


def from_config(config, model, mesh, params_shardings) -> Optional[TrainingEvaluator]:
  """The run's few-shot evaluator, or None when `config.fewshot.datasets` is empty / unset."""
  fs = config.get('fewshot')
  if fs is None or not datasets_of(fs.get('datasets')):
    return None
  from vit_jax.families import registry  # pylint: disable=import-outside-toplevel
  heads = registry.family_of_module(model).head_prefixes
  return TrainingEvaluator(config, model, mesh, params_shardings, heads)
