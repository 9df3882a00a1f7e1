"""Device meshes and partition rules (see sharding.py)."""

from qst_jax.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    backbone_shardings,
    batch_sharding,
    fsdp_shardings,
    make_mesh,
    place_batch,
    replicated,
)
from qst_jax.parallel.placement import ShardedPlacement

__all__ = ["DEFAULT_RULES", "MESH_AXES", "ShardedPlacement", "backbone_shardings", "batch_sharding", "fsdp_shardings", "make_mesh", "place_batch", "replicated"]
