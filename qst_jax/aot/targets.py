"""The GPUs and TPUs users have, written from their published facts.

A compile for one of these runs on the CPU (`JAX_PLATFORMS=cpu`, no device):
for a GPU through the CUDA plugin's compiler, the target written as XLA's
`GpuTargetConfigProto`; for a TPU through libtpu's compiler, the target
named by its libtpu topology ("v5e:1x1"). `topology(name, devices)` is what
`jax.experimental.topologies` needs, `abstract_mesh` a mesh over it. Both
kinds answer the planner's questions alike (`Target`): memory, bandwidth,
the tensor-unit peak, the host link, `platform`.

Figures are the vendors' data-sheet values: SM count, FP32 lanes per SM,
memory size (what the CUDA runtime reports as total, close to the marketed
GB), bandwidth, L2, boost clock, shared memory per SM and per block
(opt-in), compute capability, and the dense (not sparse) tensor-core peak
of the compute dtype for the roofline. Checked: every target compiles here
(tests/aot, scripts/compile_for_gpu.py); "h100" is byte for byte the target
the GPU-memory issue's table was compiled with; none is read off a real
device's `DeviceDescription` yet (no GPU has been lent to the project).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

from qst_jax.environment import libtpu_installed, plugin_installed
from qst_jax.errors import InputError, QSTError


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """One GPU model.

    Attributes:
      name: the key (`--plan NAME`).
      description: the device name CUDA reports.
      compute_capability: (major, minor); `sm_90` uses XLA's sm_90a features.
      sm_count: streaming multiprocessors.
      fp32_lanes_per_sm: FP32 units per SM.
      memory_bytes: device memory.
      bandwidth_bytes_s: memory bandwidth (bytes/s).
      l2_bytes: L2 cache.
      clock_ghz: boost clock.
      shared_per_sm, shared_per_block_optin: shared memory (bytes).
      bf16_tflops: dense tensor-core peak in bfloat16 (0: no bf16 tensor cores).
      fp16_tflops: dense tensor-core peak in float16.
      host_link_bytes_s: host-to-device bandwidth, one direction: the
        theoretical rate of the card's published PCIe generation and lane
        count (x16: Gen3 15.75, Gen4 31.5, Gen5 63 GB/s; the RTX 4060 Ti has
        eight lanes). Published; that transfers reach about 80% of it is
        assumed, not measured. What a backbone streamed from host memory is
        bounded by.
    """

    platform: ClassVar[str] = "gpu"
    name: str
    description: str
    compute_capability: tuple[int, int]
    sm_count: int
    fp32_lanes_per_sm: int
    memory_bytes: int
    bandwidth_bytes_s: float
    l2_bytes: int
    clock_ghz: float
    shared_per_sm: int
    shared_per_block_optin: int
    bf16_tflops: float
    fp16_tflops: float
    host_link_bytes_s: float = 31.5e9

    @property
    def has_bf16(self) -> bool:
        """bfloat16 arithmetic in hardware (compute capability 8.0 and later)."""
        return self.compute_capability >= (8, 0)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def peak_flops(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for a compute dtype (float32 runs at the float16 rate over TF32 or not: a bound)."""
        return 1e12 * (self.bf16_tflops if dtype == "bfloat16" and self.has_bf16 else self.fp16_tflops)

    def config_text(self) -> str:
        """The `GpuTargetConfigProto` text `topologies.get_topology_desc` takes."""
        major, minor = self.compute_capability
        extension = "\n    feature_extension: ACCELERATED_FEATURES" if (major, minor) == (9, 0) else ""
        minor_line = f"\n    minor: {minor}" if minor else ""
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_per_sm}
  threads_per_core_limit: {1024 if major == 7 and minor == 5 else 1536 if (major, minor) in ((8, 6), (8, 9)) else 2048}
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_lanes_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.bandwidth_bytes_s)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_per_block_optin}
  cuda_compute_capability {{
    major: {major}{minor_line}{extension}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
device_description_str: "{self.description}"
"""


@dataclasses.dataclass(frozen=True)
class TpuTarget:
    """One TPU device: a chip (v5e, v6e, v5p; v4 in megacore mode), or a TensorCore where JAX runs each core
    of a chip as a device (v3: a v3-8 is 8 devices of 16 GiB).

    Attributes:
      name: the key (`--plan NAME`).
      description: the device kind libtpu reports.
      generation: libtpu's name of the generation ("v5e").
      slices: devices -> libtpu topology ("1x1", "2x4"): the slices a mesh can
        be compiled over (a mesh of fewer devices than the topology has
        takes its first ones: one core of a v3 chip).
      memory_bytes: HBM per device.
      bandwidth_bytes_s: HBM bandwidth per device.
      bf16_tflops: peak bfloat16 matrix-unit rate per device.
      host_link_bytes_s: host-to-HBM bandwidth; 0: not published, so the
        planner gives no host-link bound for a streamed backbone.
      chip_config: libtpu's chip configuration ("megacore": a v4 chip's two
        TensorCores as one device, as JAX runs a v4; "": the default).
      core_devices: each TensorCore is a device (v3), so slices count cores.
    """

    platform: ClassVar[str] = "tpu"
    name: str
    description: str
    generation: str
    slices: dict[int, str]
    memory_bytes: int
    bandwidth_bytes_s: float
    bf16_tflops: float
    host_link_bytes_s: float = 0.0
    chip_config: str = ""
    core_devices: bool = False

    has_bf16: ClassVar[bool] = True

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / 2**30

    def peak_flops(self, dtype: str) -> float:
        """The bfloat16 matrix-unit rate (float32 matmuls run as several bfloat16 passes: a bound)."""
        return 1e12 * self.bf16_tflops


Target = GpuTarget | TpuTarget
GIB = 2**30
_LINE_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4"}
TARGETS: dict[str, Target] = {t.name: t for t in (
    # Colab's free GPU: Turing, no bf16 (the compute dtype falls back to float16), 16 GB GDDR6 at 320 GB/s.
    GpuTarget("t4", "Tesla T4", (7, 5), 40, 64, 16_106_127_360, 320e9, 4 * 2**20, 1.59, 65536, 65536, 0.0, 65.0,
              15.75e9),  # PCIe Gen3 x16
    # Colab's L4: Ada, 24 GB GDDR6 at 300 GB/s, 121 dense bf16 TFLOP/s.
    GpuTarget("l4", "NVIDIA L4", (8, 9), 58, 128, 24_152_899_584, 300e9, 48 * 2**20, 2.04, 102400, 101376,
              121.0, 121.0, 31.5e9),  # PCIe Gen4 x16
    # The consumer cards a backbone streamed from host memory is for (`model.offload`): GeForce tensor cores run
    # bf16 with float32 accumulation at half their float16-accumulate rate; the dense float32-accumulate figure here.
    GpuTarget("rtx4090", "NVIDIA GeForce RTX 4090", (8, 9), 128, 128, 25_757_220_864, 1008e9, 72 * 2**20, 2.52,
              102400, 101376, 165.2, 165.2, 31.5e9),  # PCIe Gen4 x16
    GpuTarget("rtx3090", "NVIDIA GeForce RTX 3090", (8, 6), 82, 128, 25_769_803_776, 936e9, 6 * 2**20, 1.695,
              102400, 101376, 71.0, 71.0, 31.5e9),  # PCIe Gen4 x16
    GpuTarget("rtx4060ti-16", "NVIDIA GeForce RTX 4060 Ti", (8, 9), 34, 128, 17_175_150_592, 288e9, 32 * 2**20, 2.535,
              102400, 101376, 44.1, 44.1, 15.75e9),  # PCIe Gen4 x8: the card has eight lanes
    GpuTarget("a100-40", "NVIDIA A100-SXM4-40GB", (8, 0), 108, 64, 42_298_834_944, 1555e9, 40 * 2**20, 1.41,
              167936, 166912, 312.0, 312.0, 31.5e9),  # PCIe Gen4 x16 host link
    GpuTarget("a100-80", "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 85_198_045_184, 2039e9, 40 * 2**20, 1.41,
              167936, 166912, 312.0, 312.0, 31.5e9),
    GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 84_942_979_072, 3.35232e12, 50 * 2**20, 1.98,
              233472, 232448, 989.0, 989.0, 63e9),  # PCIe Gen5 x16 host link
    GpuTarget("h200", "NVIDIA H200 141GB HBM3e", (9, 0), 132, 128, 151_397_597_184, 4.8e12, 50 * 2**20, 1.98,
              233472, 232448, 989.0, 989.0, 63e9),
    # Google Cloud's published per-chip figures: HBM, its bandwidth, peak bf16 (Colab's and Kaggle's TPU runtimes
    # are v5e, v6e and Kaggle's v3-8; a v4 chip is one device in megacore mode, as JAX runs it; a v3 chip is two
    # devices, each half the chip: 16 GiB, 450 GB/s, 61.5 TFLOP/s).
    TpuTarget("v5e", "TPU v5 lite", "v5e", _LINE_2D, 16 * 2**30, 819e9, 197.0),
    TpuTarget("v6e", "TPU v6 lite", "v6e", _LINE_2D, 32 * 2**30, 1640e9, 918.0),
    TpuTarget("v5p", "TPU v5", "v5p", {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4"}, 95 * 2**30, 2765e9, 459.0),
    TpuTarget("v4", "TPU v4", "v4", {1: "1x1x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4"}, 32 * 2**30, 1200e9, 275.0,
              chip_config="megacore"),
    TpuTarget("v3", "TPU v3", "v3", {1: "1x1", 2: "1x1", 8: "2x2", 32: "4x4"}, 16 * 2**30, 450e9, 61.5,
              core_devices=True),
)}


def target(name: str) -> Target:
    """The target called `name` (case-insensitive).

    Raises:
      ValueError: an unknown name, listing the known ones.
    """
    key = name.lower()
    if key not in TARGETS:
        raise InputError(f"--plan {name!r}: not a known GPU or TPU; one of {', '.join(TARGETS)}")
    return TARGETS[key]


class AotUnavailable(QSTError, RuntimeError):
    """The compiler for a target is not installed (`bash scripts/setup.sh aot` for GPUs, `tpu` for TPUs)."""


class DoesNotFit(QSTError, RuntimeError):
    """The target's compiler refuses a program for its memory (libtpu's CompileTimeHbmOom; a GPU compile reports
    its peak instead)."""


@functools.lru_cache(maxsize=None)
def topology(name: str, devices: int = 1) -> Any:
    """`jax.experimental.topologies` description of `devices` devices of target `name` (GPUs: one host).

    Raises:
      AotUnavailable: without the CUDA plugin (a GPU) or libtpu (a TPU).
      InputError: a TPU slice of a chip count the target has no topology for.
    """
    from jax.experimental import topologies

    t = target(name)
    if isinstance(t, TpuTarget):
        if not libtpu_installed():
            raise AotUnavailable("compiling for a TPU needs libtpu: bash scripts/setup.sh tpu (jax[tpu], a 214 MB "
                                 "wheel; no TPU needed)")
        if devices not in t.slices:
            unit = "devices (TensorCores)" if t.core_devices else "chips"
            raise InputError(f"{name}: no slice of {devices} {unit}; one of {sorted(t.slices)}")
        # libtpu asks the cloud's metadata server which TPU it is on unless told not to, and locks itself to one
        # process: neither matters to a deviceless compile (several test workers compile at once).
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        options = {"chip_config_name": t.chip_config} if t.chip_config else {}
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{t.generation}:{t.slices[devices]}",
                                            **options)
    if not plugin_installed():
        raise AotUnavailable("compiling for a GPU needs the CUDA plugin: bash scripts/setup.sh aot "
                             "(jax[cuda13-local], about 150 MB, no CUDA libraries)")
    return topologies.get_topology_desc(platform="cuda", target_config=t.config_text(), topology=f"1x1x{devices}")


def abstract_mesh(name: str, shape: tuple[int, ...] = (1,), axes: tuple[str, ...] = ("x",)) -> Any:
    """A `jax.sharding.Mesh` over abstract devices of target `name` (product of `shape` devices)."""
    import math

    import jax
    import numpy as np
    from jax.experimental import topologies

    topo = topology(name, math.prod(shape))
    if len(topo.devices) > math.prod(shape):  # one core of a v3 chip: its first device
        return jax.sharding.Mesh(np.asarray(topo.devices[: math.prod(shape)]).reshape(shape), axes)
    return topologies.make_mesh(topo, shape, axes)
