"""Many side networks served from one backbone pass: each row's side network gathered by index.

    served = IndexedSides(backbone.cfg, shapes=(SideConfig(),))      # one stack per side shape
    params = {"stacks": (stack,), "group": group, "index": index}    # stack leaves [K, ...]; group, index [B]
    o, caches = served.hidden(params, backbone.params, ids, mask, key_mask=..., caches=..., cache_index=slots)

Row b goes through member `index[b]` of stack `group[b]` (-1: the base model
alone). Each layer gathers the rows' params from the stack
(`side_groups.RowSides`), so a step costs the same whether the stack holds 2 or
200 side networks; side networks of another shape are another stack, and
each stack runs on every row (its result is kept for its own rows). The KV
caches are one per row, whichever side network the row uses, and
`cache_index` may be `[B]` (each row its own slot: continuous batching).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qst_jax.methods.base import TaskHeads
from qst_jax.methods.side_config import SideConfig, side_model_config
from qst_jax.methods.side_groups import RowSides
from qst_jax.methods.side_network import joint_pass
from qst_jax.methods.side_params import init_side_params
from qst_jax.models.config import ModelConfig
from qst_jax.models.decoder import init_caches
from qst_jax.models.layers import Params


@dataclasses.dataclass(frozen=True)
class IndexedSides(TaskHeads):
    """A `Method` (LM task) whose row b runs side network `index[b]` of stack `group[b]`.

    Attributes:
      cfg: the backbone's ModelConfig.
      shapes: one SideConfig per stack (the side shape its members share).
      dtype, ce_chunk, attention_impl: as for QSTModel.
    """

    name: ClassVar[str] = "indexed"
    cfg: ModelConfig
    shapes: tuple[SideConfig, ...]
    dtype: Any = jnp.bfloat16
    ce_chunk: int = 1024
    attention_impl: str | None = None

    task: ClassVar[str] = "lm"
    num_labels: ClassVar[int] = 0
    pool: ClassVar[str] = "last"

    def init(self, key: jax.Array) -> Params:
        """Stacks of one (random) member each, and every row on the base model: the params' structure."""
        keys = jax.random.split(key, max(len(self.shapes), 1))
        stacks = tuple(jax.tree.map(lambda x: x[None], init_side_params(self.cfg, s, k))
                       for s, k in zip(self.shapes, keys))
        return {"stacks": stacks, "group": jnp.full((1,), -1, jnp.int32), "index": jnp.zeros((1,), jnp.int32)}

    def hidden(self, params: Params, backbone_params: Params, ids: jax.Array, mask: jax.Array, *,
               positions: jax.Array | None = None, key_mask: jax.Array | None = None,
               caches: Params | None = None, cache_index: jax.Array | None = None):
        group, index = params["group"], params["index"]
        groups = tuple(RowSides(shape, stack, jnp.where(group == g, index, 0))
                       for g, (shape, stack) in enumerate(zip(self.shapes, params["stacks"])))
        base, outs, caches = joint_pass(backbone_params, self.cfg, groups, ids, mask, positions=positions,
                                        key_mask=key_mask, caches=caches, cache_index=cache_index, dtype=self.dtype,
                                        attention_impl=self.attention_impl, remat_side=False, hidden_store="compute")
        o = base
        for g, out in enumerate(outs):
            o = jnp.where((group == g)[:, None, None], out, o)
        return o, caches

    def init_caches(self, batch: int, length: int) -> Params:
        """The backbone's caches and one per stack, every one `[L, batch, length, ...]`."""
        side = tuple(init_caches(side_model_config(self.cfg, s), batch, length, self.dtype) for s in self.shapes)
        return {"backbone": init_caches(self.cfg, batch, length, self.dtype), "side": side}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, "shapes": [s.to_dict() for s in self.shapes]}
