"""The summary command: counts, GFLOPs and the parameter listing, without allocating weights."""
import os
import subprocess
import sys

import pytest

from tests.test_vit import EXPECTED_COUNTS
from vit_jax import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name', sorted(EXPECTED_COUNTS))
def test_summary_last_line_is_param_count(name):
  text = summary.summarize(name, 1000, (224, 224))
  assert text.splitlines()[-1] == f'params: {EXPECTED_COUNTS[name]}'


def test_gflops_of_vit_b16():
  # 17.56 GMACs is the figure timm and the papers report for ViT-B/16 at 224.
  text = summary.summarize('ViT-B_16', 1000, (224, 224))
  assert 'forward: 35.13 GFLOPs per image (17.56 GMACs)' in text


def test_params_listing_in_forward_order():
  lines = summary.summarize('ViT-B_16', 1000, (224, 224), list_params=True).splitlines()
  paths = [l.split()[0] for l in lines[2:-2]]  # after the model and tokens lines
  assert paths[0].startswith('embedding/') and paths[-1].startswith('head/')
  assert paths.index('Transformer/encoderblock_2/LayerNorm_0/bias') < paths.index(
      'Transformer/encoderblock_10/LayerNorm_0/bias')
  assert len(paths) == 4 + 1 + 1 + 12 * 16 + 2


def test_command_line_vit_h14():
  out = subprocess.run([sys.executable, '-m', 'vit_jax.summary', '--model', 'ViT-H_14',
                        '--num_classes', '1000', '--image_size', '224'],
                       capture_output=True, text=True, check=True, timeout=120, cwd=ROOT)
  assert out.stdout.strip().splitlines()[-1] == 'params: 632045800'


def test_command_line_unknown_model_is_an_error():
  out = subprocess.run([sys.executable, '-m', 'vit_jax.summary', '--model', 'ViT-Z_1'],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert out.returncode != 0 and 'registered models' in out.stderr
