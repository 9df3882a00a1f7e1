"""Flax NNX front door: the frozen backbone, QST and QLoRA as `nnx.Module`s over the functional core.

  Backbone        the frozen decoder; its weights are `FrozenWeight` leaves (NF4)
  QST, QLoRA      a method's trainable params as `nnx.Param`; `__call__` and
                  `loss` run the method's own pure functions
  Tuned           their base: `from_run` (an export), `from_config` (a run
                  config), `export`, `functional()`
  NNXCheckpointer orbax checkpoints of `nnx.Param`s and an `nnx.Optimizer`

`modules.py` shows the loop; README's "Python API" and the notebook's "Your own
Flax loop" run it.
"""

from qst_jax.nnx.checkpoint import NNXCheckpointer
from qst_jax.nnx.modules import QST, Backbone, FrozenWeight, QLoRA, Tuned

__all__ = ["QST", "Backbone", "FrozenWeight", "NNXCheckpointer", "QLoRA", "Tuned"]
