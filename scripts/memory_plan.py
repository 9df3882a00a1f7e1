"""Bytes per device of a sharded QST setup, from shapes alone (`jax.eval_shape`).

    python scripts/memory_plan.py --shape 70b --fsdp 2      # 2 x 40 GB
    python scripts/memory_plan.py --shape 70b --fsdp 8 --side fsdp     # 8 x 24 GB, as configs/chat_70b_fsdp8.py

Counts the NF4 backbone as the partition rules shard it (qst_jax.parallel),
the side params, gradients and AdamW state (replicated, or split over fsdp
with `--side fsdp`: `parallel.side`), and the backbone hidden states
the backward pass keeps (L x B_local x T x d in bf16, or fp8). It allocates
nothing; activations of one layer and XLA's workspace are not counted.
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
from jax.sharding import PartitionSpec

from qst_jax.models.random_init import llama2_config, random_params
from qst_jax.parallel.sharding import backbone_specs
from qst_jax.methods.side_config import SideConfig
from qst_jax.methods.side_params import init_side_params


class _Sizes:
    """Stands in for a Mesh where only axis sizes matter."""

    def __init__(self, data: int, fsdp: int, tensor: int):
        self.shape = {"data": data, "fsdp": fsdp, "tensor": tensor}


def backbone_bytes_per_device(params, sizes: _Sizes) -> int:
    """Bytes of `params` (arrays or shape structs) on one device, sharded as `backbone_specs` says."""
    specs = backbone_specs(params, sizes)
    per_leaf = jax.tree.map(lambda spec, leaf: _sharded_bytes(leaf, spec, sizes), specs, params,
                            is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(jax.tree_util.tree_leaves(per_leaf))


def _sharded_bytes(array, spec, sizes: _Sizes) -> int:
    parts = 1
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis:
                parts *= sizes.shape[axis]
    return int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize // parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="70b", choices=["7b", "13b", "70b"])
    parser.add_argument("--data", type=int, default=1)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16, help="global sequences per micro-batch")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden-store", default="compute", choices=["compute", "fp8"])
    parser.add_argument("--side", default="replicated", choices=["replicated", "fsdp"],
                        help="parallel.side: the side params and optimizer state copied or split over fsdp")
    args = parser.parse_args()

    cfg = llama2_config(args.shape)
    sizes = _Sizes(args.data, args.fsdp, args.tensor)
    devices = args.data * args.fsdp * args.tensor
    params = jax.eval_shape(lambda k: random_params(cfg, k), jax.random.PRNGKey(0))
    side = jax.eval_shape(lambda k: init_side_params(cfg, SideConfig(), k), jax.random.PRNGKey(0))
    side_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(side))
    split = args.fsdp if args.side == "fsdp" else 1  # about: leaves too small or too odd to split stay whole
    backbone = backbone_bytes_per_device(params, sizes)
    local_batch = math.ceil(args.batch / (args.data * args.fsdp))
    hidden = cfg.num_layers * local_batch * args.seq * cfg.hidden_size * (1 if args.hidden_store == "fp8" else 2)
    rows = [
        ("NF4 backbone (sharded)", backbone),
        (f"side params, float32 ({args.side})", side_bytes // split),
        ("AdamW state (2 x side params)", 2 * side_bytes // split),
        ("gradients (float32)", side_bytes // split),
        (f"kept backbone states ({args.hidden_store}, {local_batch} x {args.seq} per device)", hidden),
    ]
    gib = 1024**3
    print(f"LLaMA-2-{args.shape} shape on {devices} device(s), mesh data={args.data} fsdp={args.fsdp} tensor={args.tensor}")
    for name, value in rows:
        print(f"  {name:<58} {value / gib:8.2f} GiB")
    print(f"  {'total per device (without one layer of activations)':<58} {sum(v for _, v in rows) / gib:8.2f} GiB")


if __name__ == "__main__":
    main()
