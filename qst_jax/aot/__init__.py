"""Compiling qst_jax's programs for a named GPU or TPU on a machine without one (deviceless AOT).

`targets` holds the GPUs and TPUs users have, from their published facts; `compile`
compiles any jitted program for one of them from abstract arguments (nothing
materialised) and reports XLA's memory figures, flops and bytes with the
loops counted at their trip counts, and a roofline step time (an estimate);
`qst_jax.train.plan` does that for a run's own train step (`qst-train --plan h100`).
"""

from qst_jax.aot.targets import TARGETS, GpuTarget, Target, TpuTarget, target

__all__ = ["TARGETS", "GpuTarget", "Target", "TpuTarget", "target"]
