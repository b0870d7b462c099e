"""vit_jax.eval.sinks on constructed cases: a planted high-norm patch token is found (and only it),
a map without one flags nothing, the reader's attention is split into class token, registers,
outlier patches and other patches by hand, and the per-image numbers average as documented."""
from __future__ import annotations

import numpy as np
import pytest

from vit_jax.eval import attention as A
from vit_jax.eval import sinks


def _tokens(rng, b=3, n=49, d=16):
  """Patch tokens of unit-ish norm: directions random, norms in [0.8, 1.2]."""
  x = rng.normal(size=(b, n, d))
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return x * rng.uniform(0.8, 1.2, (b, n, 1))


def test_a_planted_high_norm_token_is_found_and_nothing_else():
  rng = np.random.default_rng(0)
  tokens = _tokens(rng)
  clean = sinks.norm_stats(sinks.token_norms(tokens))
  assert np.all(clean['outlier_fraction'] == 0)
  assert np.all(clean['max_over_median'] < 1.6)
  tokens[1, 17] *= 8.0                                  # one sink in image 1
  norms = sinks.token_norms(tokens)
  mask = sinks.outliers(norms)
  assert mask.sum() == 1 and mask[1, 17]
  stats = sinks.norm_stats(norms)
  np.testing.assert_allclose(stats['outlier_fraction'], [0, 1 / 49, 0])
  assert stats['max_over_median'][1] == pytest.approx(norms[1, 17] / np.median(norms[1]))
  assert stats['max_over_median'][1] > 5
  # A token at 2.5x the median is no outlier at the default 3x, but is at 2x.
  tokens = _tokens(rng)
  norms = sinks.token_norms(tokens)
  norms[0, 3] = 2.5 * np.median(norms[0])
  assert not sinks.outliers(norms)[0, 3] and sinks.outliers(norms, 2.0)[0, 3]
  with pytest.raises(ValueError, match='must exceed 1'):
    sinks.outliers(norms, 1.0)


def test_reader_attention_split_by_hand():
  # 1 class token, 2 registers, 4 patches; the class token's row: 0.1 self, 0.2 + 0.3 registers,
  # patches 0.05, 0.25, 0.05, 0.05; patch 1 is the outlier.
  row = np.array([0.1, 0.2, 0.3, 0.05, 0.25, 0.05, 0.05])
  attn = np.full((1, 2, 7, 7), 1 / 7)
  attn[0, :, 0] = row
  mask = np.array([[False, True, False, False]])
  got = sinks.reader_attention(attn, 3, 2, mask, class_token=True)
  assert got['class'][0] == pytest.approx(0.1)
  assert got['registers'][0] == pytest.approx(0.5)
  np.testing.assert_allclose(got['registers_each'][0], [0.2, 0.3])
  assert got['outlier_patches'][0] == pytest.approx(0.25)
  assert got['other_patches'][0] == pytest.approx(0.15)
  assert got['top_patch'][0] == pytest.approx(0.25)
  # A pooled reader (no class token read): the patch queries' rows (uniform here), averaged.
  got = sinks.reader_attention(attn, 3, 2, mask, class_token=False)
  assert got['outlier_patches'][0] == pytest.approx(1 / 7)
  assert got['registers'][0] == pytest.approx(2 / 7)
  with pytest.raises(ValueError, match='outlier mask'):
    sinks.reader_attention(attn, 3, 2, mask[:, :3], class_token=True)
  with pytest.raises(ValueError, match='class token'):
    sinks.reader_attention(attn, 2, 2, np.zeros((1, 5), bool), class_token=True)
  # The per-layer token shares of `vit_jax.eval.attention` agree on the same row.
  to_prefix, to_patches = A.token_shares(attn[None], 3, class_token=True)
  np.testing.assert_allclose(to_prefix[0], row[:3])
  assert to_patches[0] == pytest.approx(0.4)


def test_measure_and_summarize_a_sink_that_draws_the_class_token():
  """Image 0 has a high-norm patch that the class token attends to (0.6); image 1 has none."""
  rng = np.random.default_rng(1)
  prefix, n, d = 2, 16, 8                             # class token + 1 register
  patches = _tokens(rng, 2, n, d)
  patches[0, 5] *= 10.0
  tokens = np.concatenate([_tokens(rng, 2, prefix, d), patches], axis=1)
  attn = np.full((2, 1, prefix + n, prefix + n), 1 / (prefix + n))
  attn[0, 0, 0] = 0.4 / (prefix + n - 1)
  attn[0, 0, 0, prefix + 5] = 0.6
  layers = [patches.reshape(2, 4, 4, d) * 0.5, patches.reshape(2, 4, 4, d)]
  # After a final norm (here: every token scaled to unit norm) the outlier is gone.
  normed = patches / np.linalg.norm(patches, axis=-1, keepdims=True)
  part = sinks.measure_batch(attn, tokens, layers, prefix, 1, class_token=True,
                             normed_patches=normed)
  np.testing.assert_allclose(part['normed_max_over_median'], 1.0)
  assert not part['normed_outlier_fraction'].any()
  np.testing.assert_allclose(part['outlier_fraction'], [1 / 16, 0])
  assert part['attn_outlier_patches'][0] == pytest.approx(0.6)
  assert part['attn_outlier_patches'][1] == 0
  np.testing.assert_allclose(part['layer_max_over_median'][:, 0], part['max_over_median'])
  summary = sinks.summarize([part], sinks.DEFAULT_FACTOR, ['class', 'register 1'])
  assert summary['num_images'] == 2 and summary['images_with_outliers'] == 0.5
  assert summary['outlier_fraction_mean'] == pytest.approx(1 / 32, abs=1e-5)
  assert summary['reader_attention']['outlier_patches'] == pytest.approx(0.3, abs=1e-5)
  assert len(summary['reader_attention']['registers_each']) == 1
  assert len(summary['prefix_norm_over_patch_median']) == 2
  assert len(summary['max_over_median_per_layer']) == 2
  assert summary['after_final_norm'] == {'outlier_fraction_mean': 0.0, 'max_over_median_mean': 1.0}
