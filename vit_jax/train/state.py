"""The training state and its sharded creation.

The state is created already sharded: `jax.jit` of the init function with `out_shardings`, so no
device ever holds the whole model unless the rules replicate it.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from vit_jax import sharding as sharding_lib


class TrainState(flax.struct.PyTreeNode):
  """step: int32 scalar (updates applied); params; opt_state; rng: uint32 [2] key data, fixed for the
  run (per-step keys are fold_in(rng, step), so resuming needs no RNG bookkeeping); ema_params: an
  exponential moving average of params, or None."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None


def init_fn(model, tx: optax.GradientTransformation, input_shape: tuple[int, ...], seed: int,
            use_ema: bool, init_params: Optional[Any] = None, objective: Any = None
            ) -> Callable[[], TrainState]:
  """A function of no arguments that builds the initial state (to be jitted with out_shardings).

  input_shape: [1, H, W, C] of one image; init_params: the model's parameters to start from
  (pretrained) instead of a fresh init; objective: a `vit_jax.objectives.Objective` whose
  `initial_params` makes the state's params from the model's (its trainable part plus the
  objective's own parameters; None: the model's, all trainable).
  """
  def fn():
    rng = jax.random.PRNGKey(seed)
    init_rng, train_rng = jax.random.split(rng)
    if init_params is None:
      params = model.init(init_rng, jnp.zeros(input_shape, jnp.float32))['params']
    else:
      params = init_params
    if objective is not None:
      params = objective.initial_params(params, model, jax.random.fold_in(init_rng, 1), input_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(train_rng) if jnp.issubdtype(
                          train_rng.dtype, jax.dtypes.prng_key) else train_rng,
                      ema_params=(jax.tree.map(jnp.copy, params) if use_ema else None))
  return fn


def state_shardings(abstract_state: TrainState, mesh: Mesh, fsdp_min_size: int,
                    tensor_rules: sharding_lib.Rules = ()) -> TrainState:
  """Shardings for every leaf of the state by the rules of `vit_jax.sharding` and the family's
  tensor rules."""
  return sharding_lib.tree_shardings(abstract_state, mesh, fsdp_min_size, tensor_rules)


def create_train_state(model, tx: optax.GradientTransformation, input_shape: tuple[int, ...],
                       seed: int, mesh: Mesh, *, use_ema: bool = False, fsdp_min_size: int = 2 ** 14,
                       init_params: Optional[Any] = None, tensor_rules: sharding_lib.Rules = (),
                       objective: Any = None) -> tuple[TrainState, TrainState]:
  """(state, shardings): the initial state created directly in its sharded layout."""
  fn = init_fn(model, tx, input_shape, seed, use_ema, init_params, objective)
  abstract = jax.eval_shape(fn)
  shardings = state_shardings(abstract, mesh, fsdp_min_size, tensor_rules)
  state = jax.jit(fn, out_shardings=shardings)()
  return state, shardings


def abstract_state(model, tx, input_shape, seed, mesh, *, use_ema=False, fsdp_min_size=2 ** 14,
                   tensor_rules: sharding_lib.Rules = (), objective: Any = None):
  """(ShapeDtypeStructs with shardings, shardings): the target for restoring a checkpoint."""
  fn = init_fn(model, tx, input_shape, seed, use_ema, objective=objective)
  abstract = jax.eval_shape(fn)
  shardings = state_shardings(abstract, mesh, fsdp_min_size, tensor_rules)
  with_sharding = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, shardings)
  return with_sharding, shardings
