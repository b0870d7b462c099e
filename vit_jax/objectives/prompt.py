"""Visual prompt tuning (Jia et al., 2022, "Visual Prompt Tuning"): a frozen pretrained backbone,
trainable prompt tokens and a trainable head.

    shallow:  Z_1 = L_1([x_0, P, E_0]),  Z_i = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])   P: [p, D]
    deep:     [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])                 P: [L, p, D]
    y = Head(x_L)  (the prompt outputs are dropped before pooling and the head)

`config.prompt`: num_tokens p (0: the head alone, a linear probe, through the same code), deep,
dropout (on the prompts, training only). Every parameter of `config.pretrained` but the
classifier head(s) is frozen: it lives in the frozen extras, gets no update and no optimizer state,
and is not written to checkpoints, which hold the prompts (`objective/prompts`) and the head (a
few KB per task), plus the backbone's path and sha256 (`vit_jax.checkpoints info` shows them;
`predict` reassembles the model from them). timm and Hugging Face have no prompt tokens, so
`convert --to timm` refuses such a checkpoint. Evaluation is classification's.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vit_jax.models import tokens as tokens_lib
from vit_jax.objectives.base import model_params, own_params, patch_layout, token_width
from vit_jax.objectives.classify import Classify


def prompt_shape(num_tokens: int, deep: bool, depth: int, width: int) -> tuple[int, ...]:
  """[p, D] (shallow) or [L, p, D] (deep)."""
  return (depth, num_tokens, width) if deep else (num_tokens, width)


def trained_count(num_tokens: int, deep: bool, depth: int, width: int, head: int) -> int:
  """Trained parameters: p * D shallow, L * p * D deep, plus the head's `head` parameters."""
  return num_tokens * width * (depth if deep else 1) + head


class PromptTuning(Classify):
  """VPT on a frozen backbone (see the module docstring)."""
  name = 'prompt'
  config_key = 'prompt'
  needs = (tokens_lib.PROMPTS,)
  summary = 'visual prompt tuning: prompts and head trained, the pretrained backbone frozen'
  exportable = ('timm and Hugging Face models have no prompt tokens, and a prompt-tuned model\'s '
                'logits depend on its prompts: predict it with this project (vit_jax.predict), or '
                'fine-tune it with objective classify to export it')

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    return {'num_tokens': 10, 'deep': False, 'dropout': 0.0}

  @classmethod
  def check_config(cls, config, family) -> None:
    super().check_config(config, family)
    block = {**cls.defaults(), **dict(config.get('prompt') or {})}
    if not (isinstance(block['num_tokens'], int) and block['num_tokens'] >= 0):
      raise ValueError(f'prompt.num_tokens must be an integer >= 0 (0: the head alone, a linear '
                       f'probe), got {block["num_tokens"]!r}')
    if not isinstance(block['deep'], bool):
      raise ValueError(f'prompt.deep must be True or False, got {block["deep"]!r}')
    if not (isinstance(block['dropout'], (int, float)) and 0 <= block['dropout'] < 1):
      raise ValueError(f'prompt.dropout must be in [0, 1), got {block["dropout"]!r}')
    if not config.get('pretrained'):
      raise ValueError('objective prompt tunes prompts on a frozen backbone: set '
                       '--config.pretrained=PATH (a run workdir, .npz, timm or Hugging Face '
                       'checkpoint)')

  def __init__(self, config, **kwargs):
    super().__init__(config, **kwargs)
    self.cfg = {**self.defaults(), **dict(self.block())}
    self.head_prefixes = tuple(self.family.head_prefixes) if self.family is not None else ('head/',)

  @property
  def depth(self) -> int:
    return int(self.fields['num_layers'])

  def trainable(self, path: str) -> bool:
    return any(path == p.rstrip('/') or path.startswith(p) for p in self.head_prefixes)

  def freezes(self) -> bool:
    return True

  def init_own(self, model, rng, input_shape) -> dict[str, Any]:
    p = self.cfg['num_tokens']
    if not p:
      return {}
    d = token_width(model, input_shape)
    _, _, (ph, pw) = patch_layout(self.family, self.fields, self.config)
    # VPT's initialisation: uniform in +-sqrt(6 / (pixels per patch + D)) (Xavier over the patch
    # embedding's fan-in and the width).
    bound = math.sqrt(6.0 / (ph * pw * input_shape[-1] + d))
    shape = prompt_shape(p, self.cfg['deep'], self.depth, d)
    return {'prompts': jax.random.uniform(rng, shape, jnp.float32, -bound, bound)}

  def logits(self, model, params, extras, images, *, train: bool, rng: Any = None):
    own = own_params(params)
    if 'prompts' not in own:
      return super().logits(model, params, extras, images, train=train, rng=rng)
    prompts = own['prompts']
    rngs = {}
    if train:
      k_prompt, k_model = jax.random.split(rng)
      rngs = {'dropout': k_model}
      rate = self.cfg['dropout']
      if rate:
        keep = jax.random.bernoulli(k_prompt, 1.0 - rate, prompts.shape)
        prompts = jnp.where(keep, prompts / (1.0 - rate), 0.0)
    return model.apply({'params': model_params(params, extras)}, images, train=train, rngs=rngs,
                       tokens=tokens_lib.TokenInputs(prompts=prompts))

  def meta(self) -> dict[str, Any]:
    return {'name': self.name, 'config': {**super().meta()['config'], **self.cfg}}

  @classmethod
  def inference_tokens(cls, meta: Mapping[str, Any], own: Mapping[str, Any]) -> Any:
    if 'prompts' not in own:
      return None
    return tokens_lib.TokenInputs(prompts=jnp.asarray(own['prompts']))

  @classmethod
  def describe(cls, meta: Mapping[str, Any]) -> list[str]:
    cfg = meta.get('config') or {}
    lines = [f'objective: prompt (visual prompt tuning): {cfg.get("num_tokens")} '
             f'{"deep" if cfg.get("deep") else "shallow"} prompt tokens, dropout '
             f'{cfg.get("dropout")}; trained: prompts and head']
    frozen = meta.get('frozen_from')
    if frozen:
      lines.append(f'frozen backbone: {frozen.get("path")} (sha256 {frozen.get("sha256")})')
    return lines


OBJECTIVE = PromptTuning
