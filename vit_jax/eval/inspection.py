"""Checkpoint + images -> the paper's Fig. 7 analyses and attention maps as PNGs, JSON and a web page.

`inspect_checkpoint` is what `python -m vit_jax.inspect` runs. The checkpoint is read as `predict`
reads it (any format, any family); what is analysed is asked of the family descriptor:
  - attention rollout and the classifier's last-layer attention, one figure per image
    (`rollout_XX_<name>.png`), and the mean attention distance per head and layer over a set of
    images (`attention_distance.png`, `attention_distance.json`): need `Family.attention_fn`;
    a family without global attention maps (Mixer, Swin, PVT) is a NotImplementedError naming it.
  - where the classifier's reader (the class token, or the mean patch query of a pooled model)
    attends per layer: each prefix token by name (`Family.prefix_names`: class, distillation,
    register i) and the patches together (`token_shares.png`, `.json`); the rollout maps stay over
    the patches only and name the prefix tokens' last-layer shares in their titles
  - with sinks=True: high-norm output patch tokens and the attention they draw
    (`vit_jax.eval.sinks`; `sinks.png`, `sinks.json`)
  - position-embedding similarity (`posemb_similarity.png`, `.json`), plus a sincos2d table of the
    same grid and width as a reference when the model's is learned (`posemb_similarity_sincos2d.png`)
  - patch-embedding filters' principal components (`patch_filters.png`)
The last two are skipped, with the family's reason in the notes, where they are not defined (a
hybrid's embedding reads ResNet features, not pixels; posemb='none'). `index.html` shows it all.
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np

from vit_jax.data import get_source, preprocess
from vit_jax.eval import attention as attn_lib
from vit_jax.eval import plots
from vit_jax.eval import sinks as sinks_lib
from vit_jax.models import params as params_lib
from vit_jax.models.vit import sincos_2d


@dataclasses.dataclass
class Images:
  """Images at the model's size: `pixels` uint8 [n, H, W, C] (for display), `inputs` float32
  [n, H, W, C] normalised as the checkpoint declares, a name and the true class name (or None)."""
  names: list[str]
  pixels: np.ndarray
  inputs: np.ndarray
  labels: list[Optional[str]]

  def __len__(self) -> int:
    return len(self.names)

  def take(self, n: int) -> 'Images':
    return Images(self.names[:n], self.pixels[:n], self.inputs[:n], self.labels[:n])


def prepare(raws: Sequence[Any], names: Sequence[str], arch: Any,
            labels: Optional[Sequence[str]] = None) -> Images:
  """Encoded bytes or uint8 arrays -> Images, resized and normalised as `predict` does."""
  pixels = [preprocess.eval_example(r, tuple(arch.image_size), arch.channels, name=n)
            for r, n in zip(raws, names)]
  if not pixels:
    raise ValueError('no images to inspect')
  pixels = np.stack(pixels)
  inputs = preprocess.normalize(pixels, arch.mean, arch.std)
  return Images(list(names), pixels, inputs, list(labels) if labels is not None else
                [None] * len(names))


def image_files(paths: Sequence[str], arch: Any) -> Images:
  from vit_jax.predict import list_images  # pylint: disable=import-outside-toplevel
  files = list_images(paths)
  raws = []
  for p in files:
    with open(p, 'rb') as f:
      raws.append(f.read())
  return prepare(raws, files, arch)


def dataset_images(name: str, arch: Any, n: int, split: str = 'test',
                   data_dir: Optional[str] = None) -> Images:
  """The first `n` examples of a dataset's split (its evaluation split by default)."""
  if n < 1:
    raise ValueError(f'--num_images must be at least 1, got {n}')
  source = get_source(name, data_dir=data_dir, split=split)
  items = [source[i] for i in range(min(n, len(source)))]
  names = source.class_names
  return prepare([e['image'] for e in items], [e['name'] for e in items], arch,
                 [names[e['label']] if names else str(e['label']) for e in items])


def padded_batches(images: np.ndarray, batch_size: int):
  """Yields (batch [batch_size, ...], n real images) over consecutive slices; the last is padded
  with zeros so that one compiled function serves every call."""
  for i in range(0, len(images), batch_size):
    batch = images[i:i + batch_size]
    n = len(batch)
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    yield batch, n


def attention_batches(fn: Any, params: Any, images: np.ndarray, batch_size: int):
  """Yields (logits [b, classes], attention [L, b, heads, N, N]) float32 numpy for consecutive
  batches of images (`padded_batches`, the padding dropped)."""
  for batch, n in padded_batches(images, batch_size):
    logits, attn = fn(params, batch)
    yield np.asarray(logits[:n], np.float32), np.asarray(attn[:, :n], np.float32)


def _slug(name: str) -> str:
  base = os.path.splitext(os.path.basename(name))[0]
  return re.sub(r'[^A-Za-z0-9_-]+', '_', base).strip('_')[:40] or 'image'


@dataclasses.dataclass
class Report:
  """What was written: (section title, file name relative to out_dir, caption) and notes."""
  out_dir: str
  title: str
  source: str = ''
  figures: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  data: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def path(self, name: str) -> str:
    return os.path.join(self.out_dir, name)

  def write_json(self, name: str, value: dict[str, Any]) -> None:
    """One key per line (a [layers][heads] table stays one line: readable and diffable)."""
    lines = [f' {json.dumps(k)}: {json.dumps(v)}' for k, v in value.items()]
    with open(self.path(name), 'w') as f:
      f.write('{\n' + ',\n'.join(lines) + '\n}\n')
    self.data.append(name)


def inspect_checkpoint(predictor: Any, out_dir: str, *, images: Optional[Images] = None,
                       dataset_imgs: Optional[Images] = None, rollout_count: int = 4,
                       batch_size: int = 32, source: str = '', sinks: bool = False,
                       sink_factor: float = sinks_lib.DEFAULT_FACTOR) -> Report:
  """Writes every defined analysis of `predictor` (a `vit_jax.predict.Predictor`) into out_dir.

  Args:
    images: rollout figures are drawn for these (else for the first `rollout_count` of
      dataset_imgs); the attention distance averages over dataset_imgs (else over these).
  Returns:
    the Report (figures, JSON files, notes on what was skipped and why); index.html is written.
    sinks: also measure high-norm output tokens and the attention they draw (`sinks.json`,
      `vit_jax.eval.sinks`) over the distance's images, with outliers at `sink_factor` x median.
  """
  arch = predictor.arch
  family = arch.get_family()
  # Asked first: a family without attention maps fails before any image is read or model run.
  prefix, grid, patch_hw = family.token_layout(arch)
  attn_fn = jax.jit(family.attention_fn(arch))
  if images is None and dataset_imgs is None:
    raise ValueError('give image files, --dataset NAME, or both: the attention analyses need images')
  os.makedirs(out_dir, exist_ok=True)
  report = Report(out_dir, f'{arch.name} ({family.name})', source)
  batch_size = max(1, min(batch_size, max(len(x) for x in (images, dataset_imgs) if x is not None)))
  flat = params_lib.flatten_numpy(family.to_file_layout(predictor.params))

  shown = images if images is not None else dataset_imgs.take(rollout_count)
  names = family.prefix_names(arch)
  reads_class = family.reads_class_token(arch)
  _rollout_figures(report, predictor, attn_fn, shown, prefix, grid, batch_size, reads_class,
                   names)
  averaged = dataset_imgs if dataset_imgs is not None else images
  _distance(report, attn_fn, predictor.params, averaged, prefix, grid, patch_hw, batch_size,
            names, reads_class)
  if sinks and family.intermediate_unit != 'blocks':
    report.notes.append(f'sinks skipped: the {family.name} family gives no per-block token maps')
  elif sinks:
    _sinks(report, predictor, attn_fn, averaged, names, reads_class, batch_size, sink_factor)
  try:
    kind, table = family.position_table(flat, arch)
    _posemb(report, kind, table)
  except NotImplementedError as e:
    report.notes.append(f'position-embedding similarity skipped: {e}')
  try:
    _filters(report, family.patch_filters(flat, arch))
  except NotImplementedError as e:
    report.notes.append(f'patch-embedding filters skipped: {e}')
  _objective_figures(report, predictor, shown)
  write_index(report)
  return report


def _objective_figures(report, predictor, shown: Images, seed: int = 0) -> None:
  """What the run's training objective shows (MAE reconstructions, MPP's predicted colours), on
  the rollout images; nothing for objectives without such a figure."""
  if not predictor.objective:
    return
  from vit_jax.objectives import base as objectives_base  # pylint: disable=import-outside-toplevel
  objective = objectives_base.from_checkpoint(predictor.meta or {'objective': predictor.objective},
                                              predictor.arch)
  params = {**predictor.params, objectives_base.OBJECTIVE_KEY: predictor.objective_params or {}}
  shown_figure = objective.visualize(predictor.model, params, shown.inputs,
                                     jax.random.PRNGKey(seed))
  if shown_figure is None:
    return
  name = f'objective_{objective.name}.png'
  plots.image_grid(report.path(name), shown_figure['columns'], shown.names,
                   shown_figure['title'])
  report.figures.append((shown_figure['title'], name, shown_figure['caption']))


def _rollout_figures(report, predictor, attn_fn, shown, prefix, grid, batch_size, class_token,
                     names):
  # What the classifier reads: the class token's row, or (pooled models) the patch tokens',
  # averaged (registers and an unread class token are attended to, not read).
  reader = 'class token' if class_token else 'mean of the patch tokens'
  k = 0
  for logits, attn in attention_batches(attn_fn, predictor.params, shown.inputs, batch_size):
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    rolled = attn_lib.output_token_map(attn_lib.rollout(attn), prefix, grid, class_token)
    last = attn_lib.output_token_map(attn[-1].mean(axis=1), prefix, grid, class_token)
    for i, (prob, r_map, l_map) in enumerate(zip(probs, rolled, last)):
      # The maps are over the patches only (prefix columns dropped, renormalised); what the prefix
      # tokens took in the last layer is named in the panel's title instead.
      to_prefix, to_patches = attn_lib.token_shares(attn[-1:, i:i + 1], prefix, class_token)
      split = ', '.join(f'{n.replace("register ", "reg ")} {v:.0%}'
                        for n, v in zip(names, to_prefix[0]))
      split = (split + ', ' if split else '') + f'patches {to_patches[0]:.0%}'
      title = f'{os.path.basename(shown.names[k])}'
      if predictor.arch.num_classes:  # headless models return features, not logits
        best = int(np.argmax(prob))
        title += f': predicted {predictor.label(best)} ({prob[best]:.0%})'
      if shown.labels[k] is not None:
        title += f', true {shown.labels[k]}'
      name = f'rollout_{k:02d}_{_slug(shown.names[k])}.png'
      plots.attention_overlays(
          report.path(name), shown.pixels[k],
          [(f'attention rollout\n({reader})', r_map),
           (f'last layer ({len(attn)}), heads averaged\n({reader})\n{split}', l_map)], title)
      report.figures.append(('Attention rollout', name,
                             f'{shown.names[k]}: rollout (residual added, heads averaged, layers '
                             f'multiplied) and the last layer\'s attention of the {reader}'))
      k += 1


def _distance(report, attn_fn, params, imgs, prefix, grid, patch_hw, batch_size, names,
              reads_class):
  dists, masses, shares = [], [], []
  for _, attn in attention_batches(attn_fn, params, imgs.inputs, batch_size):
    dists.append(attn_lib.attention_distance(attn, prefix, grid, patch_hw))
    masses.append(attn_lib.prefix_mass(attn, prefix))
    to_prefix, to_patches = attn_lib.token_shares(attn, prefix, reads_class)
    shares.append((len(attn[0]), np.concatenate([to_prefix, to_patches[:, None]], axis=1)))
  dist = attn_lib.summarize_distances(dists)
  mass = attn_lib.summarize_distances(masses)
  _token_shares(report, shares, names, reads_class, len(imgs))
  uniform = attn_lib.uniform_distance(grid, patch_hw)
  layers, heads = dist.shape
  report.write_json('attention_distance.json', {
      'unit': 'pixels', 'num_images': len(imgs), 'images': imgs.names[:8] + (
          ['...'] if len(imgs) > 8 else []),
      'grid': list(grid), 'patch_size_px': list(patch_hw), 'prefix_tokens': prefix,
      'uniform_attention_px': round(uniform, 4),
      'mean_distance_px': [[round(float(v), 4) for v in row] for row in dist],
      'mean_distance_px_per_layer': [round(float(v), 4) for v in dist.mean(axis=1)],
      'prefix_attention_share': [[round(float(v), 4) for v in row] for row in mass],
      'definition': 'per layer [L] and head [H]: sum_k w_qk |p_q - p_k| over patch keys k (weights '
                    'renormalised over the patch keys), averaged over patch queries q and images'})
  name = 'attention_distance.png'
  plots.distance_scatter(report.path(name), dist, uniform,
                         f'Mean attention distance, {report.title}: {len(imgs)} images, '
                         f'{grid[0]}x{grid[1]} patches of {patch_hw[0]}x{patch_hw[1]} px')
  report.figures.append(('Mean attention distance', name,
                         f'{layers} layers x {heads} heads over {len(imgs)} images; dashed: uniform '
                         f'attention ({uniform:.1f} px). Numbers: attention_distance.json'))


def _token_shares(report, shares, names, reads_class, num_images):
  """Per layer, the share of the reader's attention each prefix token and the patches get."""
  total = sum(n for n, _ in shares)
  table = sum(n * s for n, s in shares) / total       # [L, prefix + 1], images weighted
  reader = 'class token' if reads_class else 'mean patch query'
  columns = list(names) + ['patches']
  report.write_json('token_shares.json', {
      'reader': reader, 'num_images': num_images, 'tokens': columns,
      'share_per_layer': [[round(float(v), 5) for v in row] for row in table],
      'definition': f"per layer, the {reader}'s attention (heads and images averaged) summed over "
                    'each prefix token and over all patch tokens; rows sum to 1'})
  name = 'token_shares.png'
  plots.token_shares(report.path(name), table, columns,
                     f'Where the {reader} attends, {report.title}: {num_images} images')
  report.figures.append(('Attention to prefix tokens and patches', name,
                         f'per layer, the {reader}\'s attention to ' + ', '.join(columns) +
                         ' (heads and images averaged). Numbers: token_shares.json'))


def _sinks(report, predictor, attn_fn, imgs, names, reads_class, batch_size, factor):
  """High-norm output tokens and the attention they draw (`vit_jax.eval.sinks`): sinks.json and a
  histogram of the patch-token norms over their image's median."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = predictor.arch.create_model(dtype=jnp.float32)
  registers = sum(n.startswith('register') for n in names)
  tokens_fn, parts, ratios = None, [], []
  for batch, n in padded_batches(imgs.inputs, batch_size):
    _, attn = attn_fn(predictor.params, batch)
    if tokens_fn is None:  # every block's output, before the final norm (the backbone API)
      layers = tuple(range(attn.shape[0]))
      tokens_fn = jax.jit(lambda p, x, layers=layers: (
          model.apply({'params': p}, x, intermediates=layers, norm=False),
          model.apply({'params': p}, x, intermediates=layers[-1:], norm=True)['maps'][0]))
    out, normed = tokens_fn(predictor.params, batch)
    maps = [np.asarray(m[:n], np.float32) for m in out['maps']]
    last = maps[-1].reshape(n, -1, maps[-1].shape[-1])
    tokens = np.concatenate([np.asarray(out['prefix'][-1][:n], np.float32), last], axis=1)
    parts.append(sinks_lib.measure_batch(np.asarray(attn[-1, :n], np.float32), tokens, maps,
                                         len(names), registers, reads_class, factor,
                                         np.asarray(normed[:n], np.float32)))
    norms = sinks_lib.token_norms(last)
    ratios.append(norms / np.median(norms, axis=-1, keepdims=True))
  summary = sinks_lib.summarize(parts, factor, names)
  report.write_json('sinks.json', summary)
  name = 'sinks.png'
  plots.norm_histogram(report.path(name), np.concatenate(ratios).ravel(), factor,
                       f'Output patch-token norms, {report.title}: {summary["num_images"]} images')
  shares = summary['reader_attention']
  report.figures.append((
      'High-norm tokens (attention sinks)', name,
      f'patch-token norms of the last block over their image\'s median; '
      f'{summary["outlier_fraction_mean"]:.2%} of patches above {factor:g}x, max/median '
      f'{summary["max_over_median_mean"]:.2f} on average; the reader\'s last-layer attention: '
      f'{shares["outlier_patches"]:.1%} to outlier patches, {shares["registers"]:.1%} to '
      f'registers. Numbers: sinks.json'))


def _posemb(report, kind, table):
  gh, gw, d = table.shape
  tables = [(kind, table)]
  if kind != 'sincos2d':
    if d % 4 == 0:
      tables.append(('sincos2d', sincos_2d(gh, gw, d)[0].reshape(gh, gw, d)))
    else:
      report.notes.append(f'no sincos2d reference: width {d} is not a multiple of 4')
  summary = {}
  for which, tab in tables:
    sim = attn_lib.posemb_similarity(tab)
    levels, mean = attn_lib.similarity_by_distance(sim)
    reference = which != kind
    name = 'posemb_similarity' + ('_sincos2d' if reference else '') + '.png'
    what = (f'sincos2d reference ({gh}x{gw}, width {d})' if reference
            else f"the model's {kind} position embedding")
    plots.posemb_grid(report.path(name), sim,
                      f'Position-embedding similarity: {what}')
    report.figures.append(('Position-embedding similarity', name,
                           f'{what}: cosine similarity of each patch\'s embedding (small map at its '
                           'row and column) with every patch\'s'))
    summary['reference_sincos2d' if reference else 'model'] = {
        'kind': which, 'grid': [gh, gw], 'width': d,
        'grid_distance': [float(v) for v in levels],
        'mean_similarity': [round(float(v), 4) for v in mean]}
  report.write_json('posemb_similarity.json', summary)


def _filters(report, kernel):
  comps, explained = attn_lib.patch_components(kernel)
  tiles = attn_lib.component_tiles(comps)
  kh, kw, c, d = kernel.shape
  name = 'patch_filters.png'
  plots.filter_tiles(report.path(name), tiles, explained,
                     f'Patch-embedding filters: top {len(tiles)} principal components of {d} '
                     f'filters {kh}x{kw}x{c}\n(mid-grey = 0; each scaled to its own maximum)')
  report.figures.append(('Patch-embedding filters', name,
                         f'top {len(tiles)} principal components of the {d} embedding filters '
                         f'({kh}x{kw}x{c}), with their share of the variance'))


def write_index(report: Report) -> str:
  """DIR/index.html: every figure by section, the JSON files and the notes."""
  esc = html.escape
  parts = [f'<!doctype html><meta charset="utf-8"><title>{esc(report.title)}: inspection</title>',
           '<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}'
           'figure{margin:1em 0}figcaption{color:#444;font-size:90%}</style>',
           f'<h1>{esc(report.title)}</h1>']
  if report.source:
    parts.append(f'<p>checkpoint: <code>{esc(report.source)}</code></p>')
  if report.notes:
    parts.append('<ul>' + ''.join(f'<li>{esc(n)}</li>' for n in report.notes) + '</ul>')
  section = None
  for title, name, caption in report.figures:
    if title != section:
      parts.append(f'<h2>{esc(title)}</h2>')
      section = title
    parts.append(f'<figure><img src="{esc(name)}" alt="{esc(name)}">'
                 f'<figcaption>{esc(caption)}</figcaption></figure>')
  if report.data:
    parts.append('<h2>Numbers</h2><ul>' + ''.join(
        f'<li><a href="{esc(n)}">{esc(n)}</a></li>' for n in report.data) + '</ul>')
  path = report.path('index.html')
  with open(path, 'w') as f:
    f.write('\n'.join(parts) + '\n')
  return path
