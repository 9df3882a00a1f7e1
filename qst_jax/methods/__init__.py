"""Tuning methods over a frozen backbone, behind one interface (`base.Method`).

  QSTModel     Quantized Side Tuning: a side network reads the backbone's states
  QLoRAModel   the QLoRA baseline: LoRA on every linear of the NF4 backbone
  FrozenModel  the backbone alone
  SideSet      several QST side networks over one backbone pass (sweeps,
               multi-side evaluation); IndexedSides: a side network per row (serving)

Train, eval, generate and export use only the interface; `build_model` (a run
config) and `load_tuned` (an export) are the two ways to get a method.
"""

from qst_jax.methods.base import Method
from qst_jax.methods.build import METHODS, build_model, model_from_dict
from qst_jax.methods.export import ExportError, export_side, load_side, load_tuned
from qst_jax.methods.frozen import FrozenModel
from qst_jax.methods.qlora import LORA_TARGETS, QLoRAModel
from qst_jax.methods.qst import QSTModel
from qst_jax.methods.side_config import DOWNSAMPLERS, SideConfig
from qst_jax.methods.indexed_sides import IndexedSides
from qst_jax.methods.side_set import SideSet

__all__ = [
    "DOWNSAMPLERS",
    "LORA_TARGETS",
    "METHODS",
    "ExportError",
    "FrozenModel",
    "IndexedSides",
    "Method",
    "QLoRAModel",
    "QSTModel",
    "SideConfig",
    "SideSet",
    "build_model",
    "export_side",
    "load_side",
    "load_tuned",
    "model_from_dict",
]
