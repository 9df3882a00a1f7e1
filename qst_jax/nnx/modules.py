"""Flax NNX modules over the functional core: the frozen backbone, QST and QLoRA.

    from flax import nnx
    from qst_jax import nnx as qnnx

    backbone = qnnx.Backbone(load_backbone("smollm2"))       # FrozenWeight leaves, NF4
    model = qnnx.QST(backbone, SideConfig(reduction_factor=16), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(2e-3), wrt=nnx.Param)
    loss, aux = model.loss(batch)                           # batch leaves [B, T]

A module is a front door, not a second implementation: it holds its
trainable params as `nnx.Param` leaves (float32, the same nested dict as the
method's `init`) and the backbone's weights as `FrozenWeight` leaves (an
`NF4Weight` or a dense array each), and `__call__` / `loss` hand their values
to the method's own pure functions (`methods.QSTModel.logits` / `.loss`, the
functions `qst-train` runs). So:
  - `nnx.split(model, nnx.Param, ...)`, `nnx.Optimizer(..., wrt=nnx.Param)`
    and `nnx.grad` (whose default is `nnx.Param`) never see the backbone;
  - several modules built over one `Backbone` share it (one graph node, one
    copy of the weights);
  - `functional()` gives back `(method, params)` for everything written
    against the functional core (`generate.Generator`, `eval.tasks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qst_jax.errors import InputError, UsageError
from qst_jax.methods import ExportError, FrozenModel, QLoRAModel, QSTModel, SideConfig, build_model, load_tuned
from qst_jax.methods.base import Method
from qst_jax.methods.export import export_side
from qst_jax.models.config import ModelConfig
from qst_jax.models.layers import Params
from qst_jax.models.backbone import Backbone as FunctionalBackbone
from qst_jax.quant.nf4 import NF4Weight
from qst_jax.run_dir import RunDirectory
from qst_jax.tree import count_params, flatten


class FrozenWeight(nnx.Variable):
    """One frozen backbone weight: an `NF4Weight` (codes and double-quantized scales) or a dense array.

    Not an `nnx.Param`, so `nnx.Param` filters (the optimizer's `wrt`,
    `nnx.grad`'s default) leave it out, and the backbone never gets a
    gradient or optimizer state.
    """


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _values(tree: Any) -> Any:
    """The plain pytree of a tree of Variables (each Variable replaced by its value)."""
    return jax.tree.map(lambda v: v.get_value(), tree, is_leaf=_is_variable)


def _size(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Backbone(nnx.Module):
    """The frozen decoder as an NNX module: config, dtype and `FrozenWeight` leaves.

    Calling it gives the backbone's own float32 logits `[B, T, vocab]`
    (`methods.FrozenModel`, no trainable params).

    Attributes:
      cfg: the backbone's ModelConfig.
      dtype: compute dtype.
      source: the path it was loaded from.
      weights: the params pytree (`models.decoder` documents its layout) with
        each `NF4Weight` or array wrapped in a `FrozenWeight`.
    """

    def __init__(self, backbone: FunctionalBackbone):
        self.cfg: ModelConfig = backbone.cfg
        self.dtype = backbone.dtype
        self.source: str = backbone.source
        self.weights = nnx.data(jax.tree.map(FrozenWeight, backbone.params, is_leaf=lambda x: isinstance(x, NF4Weight)))

    def params(self) -> Params:
        """The plain params pytree (NF4Weight and array leaves), as the functional core takes it."""
        return _values(self.weights)

    def functional(self) -> FunctionalBackbone:
        """A `models.Backbone` over the same arrays (for `generate.Generator`, `eval`, `load_tuned`)."""
        return FunctionalBackbone(self.cfg, self.params(), self.dtype, self.source)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        method = FrozenModel(self.cfg, self.dtype)
        return method.logits({}, self.params(), *_ids_and_mask(input_ids, attention_mask, self.cfg.vocab_size))

    def __repr__(self) -> str:
        nf4 = sum(isinstance(v.get_value(), NF4Weight) for v in jax.tree.leaves(self.weights, is_leaf=_is_variable))
        c = self.cfg
        return (f"Backbone({c.family}, {c.num_layers} layers, hidden {c.hidden_size}, vocab {c.vocab_size}: frozen, "
                f"{nf4} stacked NF4 weights, {_size(self.params()) / 2**20:.1f} MiB in FrozenWeight, no nnx.Param)")

    __str__ = __repr__  # nnx.display prints str outside a notebook; treescope shows the tree in one


def _check_ids(values: Any, key: str, limit: int, what: str) -> None:
    """Refuses ids outside `[0, limit)` in a concrete array (a traced one, under the caller's jit, passes).

    Out-of-range ids gather nothing XLA complains about: the loss is silently NaN or wrong.
    """
    if isinstance(values, jax.core.Tracer):
        return
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= limit):
        bad = int(values.max()) if values.max() >= limit else int(values.min())
        raise InputError(f"{key}: id {bad} is outside the {what} of {limit}")


def _ids_and_mask(input_ids: Any, attention_mask: Any, vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    if vocab is not None:
        _check_ids(input_ids, "input_ids", vocab, "vocabulary")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones(ids.shape, jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return ids, mask


@jax.custom_vjp
def _divide_cotangent(params: Params, denom: jax.Array) -> Params:
    """`params` unchanged; the backward pass divides their cotangent by `denom`."""
    return params


def _divide_cotangent_fwd(params, denom):
    return params, denom


def _divide_cotangent_bwd(denom, ct):
    return jax.tree.map(lambda c: c / denom, ct), jnp.zeros_like(denom)


_divide_cotangent.defvjp(_divide_cotangent_fwd, _divide_cotangent_bwd)


@jax.custom_vjp
def _mean_with_unit_cotangent(total: jax.Array, denom: jax.Array) -> jax.Array:
    """`total / denom`, whose backward hands `total` the mean's cotangent undivided (`_divide_cotangent` divides)."""
    return total / denom


def _mean_fwd(total, denom):
    return total / denom, denom


def _mean_bwd(denom, ct):
    return ct, jnp.zeros_like(denom)


_mean_with_unit_cotangent.defvjp(_mean_fwd, _mean_bwd)


def _check_structure(method: Method, params: Params) -> None:
    """Raises ValueError naming the first key or shape where `params` differ from what `method.init` gives."""
    expected, found = flatten(jax.eval_shape(method.init, jax.random.PRNGKey(0))), flatten(params)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise InputError(f"params do not fit the {method.name} model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, spec in expected.items():
        if tuple(found[key].shape) != tuple(spec.shape):
            raise InputError(f"params: {key} has shape {tuple(found[key].shape)}, the {method.name} model "
                             f"expects {tuple(spec.shape)}")


def _as_module(backbone: Backbone | FunctionalBackbone) -> Backbone:
    return backbone if isinstance(backbone, Backbone) else Backbone(backbone)


class Tuned(nnx.Module):
    """A tuning method over a frozen `Backbone`: `nnx.Param` leaves in `trainable`, the method's pure functions.

    Build one with `QST(...)`, `QLoRA(...)`, `Tuned.from_config(config,
    backbone, rngs=...)` (a `qst-train` run config) or `Tuned.from_run(dir,
    backbone)` (an export); the subclass's own `from_run` / `from_config`
    refuse another method.

    Attributes:
      method: the functional method (`methods.QSTModel` or `QLoRAModel`),
        static: it holds no arrays.
      backbone: the shared `Backbone` module.
      trainable: the method's params pytree with each array an `nnx.Param`.
    """

    method_name: str | None = None  # the subclass's method; None: any

    def __init__(self, backbone: Backbone | FunctionalBackbone, method: Method, params: Params | None = None, *,
                 rngs: nnx.Rngs | None = None):
        if params is None:
            if rngs is None:
                raise UsageError(f"{type(self).__name__}: give rngs=nnx.Rngs(seed) to initialize the params")
            params = method.init(rngs.params())
        else:
            _check_structure(method, params)
        self.backbone = _as_module(backbone)
        self.method = method
        self.trainable = nnx.data(jax.tree.map(nnx.Param, params))

    # -- the functional core's calls ------------------------------------------------------------
    def params(self) -> Params:
        """The plain trainable params pytree (float32), as `method.init` gives it."""
        return _values(self.trainable)

    def functional(self) -> tuple[Method, Params]:
        """`(method, params)`: the pair `generate.Generator(..., tuned=...)`, eval and export take."""
        return self.method, self.params()

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Float32 logits: `[B, T, vocab]` (lm) or `[B, num_labels]` (classification)."""
        ids_mask = _ids_and_mask(input_ids, attention_mask, self.backbone.cfg.vocab_size)
        return self.method.logits(self.params(), self.backbone.params(), *ids_mask)

    def loss(self, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(mean loss, aux)` of one batch (leaves `[B, T]`, `methods.base` names the keys).

        The mean is weighted by tokens (lm) or examples (classification);
        `aux` holds that `weight` and the method's sums (`correct` for
        classification), all float32. Its gradient is the mean's, computed
        as `qst-train`'s step does: the backward pass runs at the loss sum's
        scale and the params' gradient is divided by the weight at the end,
        so an NNX loop's gradients are `make_train_step`'s bit for bit (a
        bf16 backward at 1/weight scale rounds differently, and Adam turns
        the sign of a near-zero gradient into a whole step).
        """
        batch = dict(batch)
        if "input_ids" in batch:
            _check_ids(batch["input_ids"], "input_ids", self.backbone.cfg.vocab_size, "vocabulary")
        if self.method.task == "classification" and not isinstance(batch.get("labels"), jax.core.Tracer):
            labels = np.asarray(batch["labels"])[np.asarray(batch.get("example_mask", 1)) > 0]
            _check_ids(labels, "labels", self.method.num_labels, "classes")
        denom = jnp.maximum(self.method.loss_weight(batch), 1.0)
        params = _divide_cotangent(self.params(), denom)
        total, (weight, aux) = self.method.loss(params, self.backbone.params(), batch)
        return _mean_with_unit_cotangent(total, denom), {"weight": weight, **aux}

    # -- files ----------------------------------------------------------------------------------
    def export(self, directory: str, extra: Mapping[str, Any] | None = None, *,
               overwrite: bool = False) -> dict[str, Any]:
        """Writes `side.safetensors` + `qst_config.json` (what qst-eval and qst-generate `--side` read).

        The directory follows qst-train's rules (`qst_jax.run_dir`): one
        writer at a time (never while a qst-train holds it), and an export
        already there (a finished run's, or an earlier one) is replaced
        only with `overwrite`; checkpoints beside it stay.

        Raises:
          RunDirectoryError: the directory is in use by a running qst-train,
            or holds an export and `overwrite` is False.
        """
        run = RunDirectory(directory, owner="export")
        run.acquire_for_export(overwrite=overwrite)
        try:
            return export_side(directory, self.method, self.params(), self.backbone.cfg, dict(extra or {}))
        finally:
            run.close()

    @classmethod
    def from_run(cls, directory: str, backbone: Backbone | FunctionalBackbone, **options: Any) -> Tuned:
        """The module of an exported run (`qst-train`'s output dir, or `export`'s), checked against `backbone`.

        Args:
          options: how the method runs (`remat_side`, `hidden_store`,
            `ce_chunk`, `attention_impl`; `remat` for QLoRA).

        Raises:
          ExportError: missing or unreadable files, another backbone, or
            (from a subclass) an export of another method.
        """
        module = _as_module(backbone)
        method, params, _ = load_tuned(directory, module)
        if options:
            method = type(method).from_dict(method.to_dict(), module.cfg, dtype=module.dtype, **options)
        return cls._wrap(module, method, params, f"{directory}/qst_config.json", ExportError)

    @classmethod
    def from_config(cls, config: Any, backbone: Backbone | FunctionalBackbone, *, rngs: nnx.Rngs) -> Tuned:
        """The module a `qst-train` run config asks for (`method`, `side`/`qlora`, `data.num_labels`, ...)."""
        module = _as_module(backbone)
        method = build_model(config, module.cfg, dtype=module.dtype)
        return cls._wrap(module, method, method.init(rngs.params()), "config", ValueError)

    @classmethod
    def _wrap(cls, module: Backbone, method: Method, params: Params, where: str, error: type) -> Tuned:
        target = {"qst": QST, "qlora": QLoRA}.get(method.name)
        if target is None:
            raise error(f"{where}: method {method.name!r} has no NNX module (qst or qlora)")
        if cls.method_name is not None and cls.method_name != method.name:
            raise error(f"{where}: holds a {method.name} model, not {cls.method_name} (use {target.__name__} or Tuned)")
        fields = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.name not in ("cfg", "dtype")}
        return target(module, params=params, **fields)

    def __repr__(self) -> str:
        count = count_params(self.params())
        return (f"{type(self).__name__}({self.method.task}, {count:,} trainable params (nnx.Param, float32) over "
                f"{self.backbone!r})")

    __str__ = __repr__


class QST(Tuned):
    """Quantized Side Tuning: a side network of `nnx.Param`s over the frozen NF4 backbone.

        QST(backbone, SideConfig(reduction_factor=16), rngs=nnx.Rngs(0))

    Args:
      backbone: a `Backbone` module (shared) or a `models.Backbone`.
      side: the side network's SideConfig (task and label count included).
      rngs: where the init key comes from (`rngs.params()`).
      params: trained params to start from instead (the structure `init` gives).
      options: `methods.QSTModel`'s run options (`remat_side`, `hidden_store`,
        `ce_chunk`, `attention_impl`); the dtype is the backbone's.
    """

    method_name = "qst"

    def __init__(self, backbone: Backbone | FunctionalBackbone, side: SideConfig | None = None, *,
                 rngs: nnx.Rngs | None = None, params: Params | None = None, **options: Any):
        module = _as_module(backbone)
        method = QSTModel(module.cfg, side or SideConfig(), dtype=module.dtype, **options)
        super().__init__(module, method, params, rngs=rngs)


class QLoRA(Tuned):
    """The QLoRA baseline: LoRA `nnx.Param`s on every linear of the frozen NF4 backbone.

        QLoRA(backbone, rank=16, alpha=16.0, rngs=nnx.Rngs(0))

    Args:
      backbone: a `Backbone` module (shared) or a `models.Backbone`.
      rank, alpha, task, num_labels, pool: as `methods.QLoRAModel`.
      rngs, params: the init key's source, or trained params, as for `QST`.
      options: its run options (`remat`, `ce_chunk`, `attention_impl`).
    """

    method_name = "qlora"

    def __init__(self, backbone: Backbone | FunctionalBackbone, *, rank: int = 16, alpha: float = 16.0,
                 task: str = "lm", num_labels: int = 2, pool: str = "last", rngs: nnx.Rngs | None = None,
                 params: Params | None = None, **options: Any):
        module = _as_module(backbone)
        method = QLoRAModel(module.cfg, rank=rank, alpha=alpha, task=task, num_labels=num_labels, pool=pool,
                            dtype=module.dtype, **options)
        super().__init__(module, method, params, rngs=rngs)
