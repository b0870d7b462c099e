"""What a training objective feeds into a token model, and the edits every such model applies alike.

The contract between objectives (`vit_jax.objectives`) and the model families: a model that declares
a capability (`Family.capabilities`) accepts the matching field of `TokenInputs` in its call,
`model.apply(params, images, tokens=TokenInputs(...), return_aux=True)`, and its aux dict always
holds the token map:
  'prefix_tokens' [B, P, D]   class / distillation tokens after the final norm (P may be 0)
  'patch_tokens'  [B, N, D]   patch tokens after the final norm, in row-major patch order; with
                              `keep`, [B, K, D] in the order of `keep`
  'pre_logits'    [B, F]      what the head reads
Prompt tokens never appear in the outputs: they are dropped before the final pooling and the head.

The edits, in the order they are applied (N = patches, D = width):
  1. `source` [B, N] int: patch i takes the embedding of patch source[i] (the ViT paper's masked patch
     prediction replaces 10% of corrupted patches by another patch's embedding);
  2. `mask` [B, N] bool with `mask_embedding` [D]: those patch embeddings are replaced by it;
  3. prefix tokens and position embeddings are added as usual;
  4. `keep` [B, K] int: only these patches enter the encoder, prefix tokens always do (MAE);
  5. `prompts` [P, D] (shallow) or [L, P, D] (deep) learned tokens inserted after the prefix tokens,
     with no position embedding (visual prompt tuning); deep prompts are re-inserted before every
     block (block i's prompt outputs are replaced by prompts[i]).
Everything is a plain array, so the objective owns (and differentiates) the mask embedding and the
prompts, and models carry no objective parameters.
"""
from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

# The capabilities a family may declare (`Family.capabilities`); objectives name what they need.
TOKEN_MASK = 'token_mask'      # `source`, `mask` and `mask_embedding` at the input
KEEP = 'keep'                  # `keep`: the encoder runs on a subset of the patches
PROMPTS = 'prompts'            # `prompts`, shallow and deep
TOKEN_MAP = 'token_map'        # aux 'prefix_tokens' / 'patch_tokens' out
TWO_HEADS = 'two_heads'        # `return_both`: a class head and a distillation head (DeiT)
CAPABILITIES = (TOKEN_MASK, KEEP, PROMPTS, TOKEN_MAP, TWO_HEADS)


@flax.struct.dataclass
class TokenInputs:
  """Optional token-level inputs of a model call; see the module docstring for shapes and order."""
  source: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
  mask_embedding: Optional[jax.Array] = None
  keep: Optional[jax.Array] = None
  prompts: Optional[jax.Array] = None

  def num_prompts(self) -> int:
    return 0 if self.prompts is None else int(self.prompts.shape[-2])

  def deep(self) -> bool:
    return self.prompts is not None and self.prompts.ndim == 3


def edit_patches(x: jax.Array, tokens: Optional[TokenInputs]) -> jax.Array:
  """Steps 1-2 on patch embeddings x [B, N, D]."""
  if tokens is None:
    return x
  if tokens.source is not None:
    x = jnp.take_along_axis(x, tokens.source[..., None].astype(jnp.int32), axis=1)
  if tokens.mask is not None:
    if tokens.mask_embedding is None:
      raise ValueError('TokenInputs.mask needs mask_embedding [D]')
    x = jnp.where(tokens.mask[..., None], tokens.mask_embedding.astype(x.dtype), x)
  return x


def keep_patches(x: jax.Array, num_prefix: int, tokens: Optional[TokenInputs]) -> jax.Array:
  """Step 4 on [B, prefix + N, D] -> [B, prefix + K, D]."""
  if tokens is None or tokens.keep is None:
    return x
  patches = jnp.take_along_axis(x[:, num_prefix:], tokens.keep[..., None].astype(jnp.int32), axis=1)
  return jnp.concatenate([x[:, :num_prefix], patches], axis=1)


def prompt_at(tokens: Optional[TokenInputs], layer: int) -> Optional[jax.Array]:
  """The [P, D] prompts that enter block `layer` (None: leave the sequence as it is)."""
  if tokens is None or tokens.prompts is None:
    return None
  if tokens.deep():
    return tokens.prompts[layer]
  return tokens.prompts if layer == 0 else None


def set_prompts(x: jax.Array, prompts: Optional[jax.Array], num_prefix: int, inserted: bool
                ) -> jax.Array:
  """x [B, prefix (+ P) + N, D]: insert prompts [P, D] after the prefix tokens (`inserted` False) or
  overwrite the ones already there (True)."""
  if prompts is None:
    return x
  b = x.shape[0]
  p = jnp.broadcast_to(prompts.astype(x.dtype)[None], (b, *prompts.shape))
  tail = num_prefix + (prompts.shape[0] if inserted else 0)
  return jnp.concatenate([x[:, :num_prefix], p, x[:, tail:]], axis=1)


def drop_prompts(x: jax.Array, num_prefix: int, tokens: Optional[TokenInputs]) -> jax.Array:
  """[B, prefix + P + N, D] -> [B, prefix + N, D]."""
  p = 0 if tokens is None else tokens.num_prompts()
  if not p:
    return x
  return jnp.concatenate([x[:, :num_prefix], x[:, num_prefix + p:]], axis=1)
