"""The jitted train step: gradient accumulation, token-weighted loss, donation.

    state = init_train_state(model, tx, key)
    step = make_train_step(model, tx)
    state, metrics = step(state, backbone_params, batch)   # batch leaves [A, B, ...]

The frozen backbone is an argument, never a closure constant, and is never
differentiated. The state (trainable params, optimizer state, step, RNG) is
donated, so XLA updates it in place. A batch carries a leading micro-batch
axis A; gradients of the summed losses are accumulated over it with
`lax.scan` and divided by the total loss weight (tokens for LM, examples for
classification), so every token counts the same whatever its micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from qst_jax.models import loops


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything that changes during training.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: trainable params (float32).
      opt_state: the optimizer's state.
      rng: a PRNG key (uint32 `[2]`), advanced once per step.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def init_train_state(model: Any, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    init_key, rng = jax.random.split(key)
    params = model.init(init_key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def accumulate_gradients(model: Any, params: Any, backbone_params: Any, batch: dict[str, jax.Array]):
    """Summed loss, weight, aux metrics and gradient-of-sum over micro-batches."""
    grad_fn = jax.value_and_grad(model.loss, has_aux=True)

    def micro(carry, mb):
        grads, total, weight, aux = carry
        (loss_sum, (w, extra)), g = grad_fn(params, backbone_params, mb)
        grads = jax.tree.map(jnp.add, grads, g)
        aux = {k: aux[k] + extra[k] for k in aux}
        return (grads, total + loss_sum, weight + w, aux), None

    first = jax.tree.map(lambda x: x[0], batch)
    _, (_, aux_shape) = jax.eval_shape(model.loss, params, backbone_params, first)
    zeros = jax.tree.map(jnp.zeros_like, params)
    aux0 = {k: jnp.zeros(v.shape, jnp.float32) for k, v in aux_shape.items()}
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0)
    (grads, total, weight, aux), _ = loops.scan(micro, init, batch)
    return grads, total, weight, aux


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    *,
    donate: bool = True,
    shardings: tuple[Any, Any, Any] | None = None,
    compiler_options: dict[str, Any] | None = None,
):
    """A jitted `(state, backbone_params, batch) -> (state, metrics)`.

    Metrics (float32 scalars): loss (weighted mean), grad_norm (before
    clipping), weight (tokens or examples), and the model's aux sums.

    Args:
      shardings: (state, backbone params, batch) shardings for a device mesh
        (`qst_jax.parallel`); the new state keeps the state's sharding.
      compiler_options: XLA options for this step's compile
        (`models.loops.streaming_options` for a streamed backbone).
    """

    def step(state: TrainState, backbone_params: Any, batch: dict[str, jax.Array]):
        grads, total, weight, aux = accumulate_gradients(model, state.params, backbone_params, batch)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        metrics = {"loss": total / denom, "grad_norm": optax.tree.norm(grads), "weight": weight, **aux}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if shardings is None:
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=compiler_options)
    state_sh, backbone_sh, batch_sh = shardings
    return jax.jit(
        step, in_shardings=(state_sh, backbone_sh, batch_sh), out_shardings=(state_sh, None),
        donate_argnums=donate_argnums, compiler_options=compiler_options,
    )
