"""NF4 (double-quantized) weights in bitsandbytes' exact layout, in pure JAX."""

from qst_jax.quant.bnb_io import load_safetensors, read_nf4, save_safetensors, to_bnb_tensors
from qst_jax.quant.matmul import Weight, linear, materialize, matmul, set_kernel_mode
from qst_jax.quant.nf4 import (
    DYNAMIC_MAP,
    NF4_TABLE,
    NF4Weight,
    QuantizationError,
    bits_per_parameter,
    quantize,
)

__all__ = [
    "DYNAMIC_MAP",
    "NF4_TABLE",
    "NF4Weight",
    "QuantizationError",
    "Weight",
    "bits_per_parameter",
    "linear",
    "load_safetensors",
    "materialize",
    "matmul",
    "quantize",
    "read_nf4",
    "save_safetensors",
    "set_kernel_mode",
    "to_bnb_tensors",
]
