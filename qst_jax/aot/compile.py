"""Compile a jitted program for a GPU or TPU target without one, and read XLA's figures off it.

    report = compile_report("h100", make, layers=32)
    print(report.lines())

`make(num_layers, for_cost)` builds the program (a jitted function) and its
abstract arguments (`jax.ShapeDtypeStruct`s, e.g. from `jax.eval_shape`:
nothing is materialised) for a model of `num_layers` layers. The memory
figures come from compiling the real program (`make(layers, False)`), as
the GPU compiler's buffer assignment has it; no autotuning runs, so expect
differences of about +-20% on a real GPU.

XLA's cost analysis counts a `while` body once. The flops and bytes here are
the whole step's: the program is compiled again with one and with two layers
with every loop unrolled (`models.loops.unrolled_loops`) and, with
`for_cost`, one micro-batch, which gives the cost outside the layers (a)
and of one layer (b); the step is `repeats * (a + layers * b)` (`repeats`:
the micro-batches, whose scan holds everything but the optimizer update, so
that update is counted `repeats` times: an over-count of a few elementwise
passes over the side params). The
roofline time is max(flops / peak tensor FLOP/s, bytes / bandwidth): an
estimate, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable
from typing import Any

import jax

from qst_jax.aot.targets import GIB, DoesNotFit, Target, abstract_mesh, target as get_target
from qst_jax.models.loops import unrolled_loops
from qst_jax.platform import targeting

Make = Callable[[int, bool], tuple[Any, tuple[Any, ...]]]


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What XLA says of one program compiled for one target.

    Attributes:
      target: the GpuTarget or TpuTarget.
      compile_s: seconds to compile the real program (this CPU).
      argument_bytes, output_bytes, temp_bytes, alias_bytes: XLA's
        `memory_analysis()` of the device (donated arguments are aliased to
        outputs, not counted twice).
      peak_bytes: what the device holds at the program's high point: XLA's
        `peak_memory_in_bytes`, or, for a program with host memory (whose
        peak XLA mixes host bytes into), arguments + temporaries + outputs
        less aliases of the device.
      host_bytes: pinned host memory the program reads (a backbone streamed
        from the host: `model.offload=weights`): host arguments, temporaries
        and outputs less aliases.
      flops, bytes_accessed: XLA's cost analysis of the whole step (loops at
        their trip counts), or None when not asked for.
      dtype: the compute dtype the roofline uses.
      streamed_bytes: host bytes crossing the host link a step (passes x
        micro-batches).
      copies_overlapped: of the bytes a layer loop copies in from host memory,
        the fraction whose copy XLA's schedule runs beside a matmul
        (`host_copy_overlap`); None when nothing streams.
      devices: the devices of the mesh it was compiled over; every byte and
        flop figure is one device's (XLA's SPMD-partitioned program).
    """

    target: Target
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    peak_bytes: int
    flops: float | None = None
    bytes_accessed: float | None = None
    dtype: str = "bfloat16"
    host_bytes: int = 0
    streamed_bytes: float = 0.0
    copies_overlapped: float | None = None
    devices: int = 1

    @property
    def fits(self) -> bool:
        """Whether the device peak fits the target's memory (host bytes are the host's RAM)."""
        return self.peak_bytes <= self.target.memory_bytes

    @property
    def bounds_s(self) -> dict[str, float] | None:
        """Seconds a step needs at each bound: compute (tensor-core peak), memory (full bandwidth) and, for a
        streamed backbone, the host link; overlapped, the largest wins."""
        if self.flops is None or self.bytes_accessed is None:
            return None
        bounds = {"compute": self.flops / self.target.peak_flops(self.dtype),
                  "memory": self.bytes_accessed / self.target.bandwidth_bytes_s}
        if self.streamed_bytes and self.target.host_link_bytes_s:
            bounds["host link"] = self.streamed_bytes / self.target.host_link_bytes_s
        return bounds

    @property
    def roofline_s(self) -> float | None:
        """The largest of `bounds_s`: an estimate."""
        bounds = self.bounds_s
        return None if bounds is None else max(bounds.values())

    def to_dict(self) -> dict[str, Any]:
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {"target": self.target.name, "compile_s": round(self.compile_s, 1),
                "argument_gib": gib(self.argument_bytes), "output_gib": gib(self.output_bytes),
                "temp_gib": gib(self.temp_bytes), "alias_gib": gib(self.alias_bytes), "peak_gib": gib(self.peak_bytes),
                "host_gib": gib(self.host_bytes), "copies_overlapped": self.copies_overlapped,
                "device_gib": round(self.target.memory_gib, 1), "fits": self.fits, "flops": self.flops,
                "bytes_accessed": self.bytes_accessed, "roofline_s": self.roofline_s, "dtype": self.dtype,
                "devices": self.devices, "jax": jax.__version__}

    def lines(self) -> str:
        t, gib = self.target, lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        over = f" x {self.devices} (per device)" if self.devices > 1 else ""
        out = [
            f"compiled for {t.name}{over} ({t.description}, {t.memory_gib:.1f} GiB), not measured: XLA's buffer "
            f"assignment without autotuning (about +-20%), jax {jax.__version__}",
            f"  compile time      {self.compile_s:.1f} s (this machine)",
            f"  arguments         {gib(self.argument_bytes)}",
            f"  outputs           {gib(self.output_bytes)} ({gib(self.alias_bytes)} of them in donated arguments)",
            f"  temporaries       {gib(self.temp_bytes)}",
            f"  peak              {gib(self.peak_bytes)}: {'fits' if self.fits else 'does NOT fit'} "
            f"in {t.memory_gib:.1f} GiB",
        ]
        if self.host_bytes:
            out.append(f"  host (pinned)     {gib(self.host_bytes)}: the streamed frozen layers (and kept states), "
                       "in host RAM")
        if self.copies_overlapped is not None:
            out.append(f"  host copies       {self.copies_overlapped:.0%} of a layer's bytes scheduled beside a matmul "
                       "(the rest exposed)")
        if self.flops is not None:
            out += [f"  flops             {self.flops:.4g} (loops at their trip counts)",
                    f"  bytes accessed    {self.bytes_accessed:.4g}",
                    f"  step time         {self.roofline_s * 1e3:.1f} ms: roofline ESTIMATE at "
                    f"{t.peak_flops(self.dtype) / 1e12:.0f} TFLOP/s ({self.dtype}) and "
                    f"{t.bandwidth_bytes_s / 1e9:.0f} GB/s, not a measurement"]
            if self.streamed_bytes and not t.host_link_bytes_s:
                out.append(f"  stream            {gib(self.streamed_bytes)} a step from host memory; {t.name} has no "
                           "published host-link bandwidth, so no bound for it here")
            elif self.streamed_bytes:
                bounds = self.bounds_s
                bound = max(bounds, key=bounds.get)
                out.append(f"  stream            {gib(self.streamed_bytes)} a step across the host link at "
                           f"{t.host_link_bytes_s / 1e9:.1f} GB/s: {bounds['host link'] * 1e3:.1f} ms; overlapped "
                           f"with compute ({bounds['compute'] * 1e3:.1f} ms), the {bound} bound wins")
        return "\n".join(out)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_MATMUL = re.compile(r"__triton_gemm|__triton_nested_gemm_fusion|__cublas|__cudnn")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO array shape such as `u8[1,4096,2048]{2,1,0}`."""
    m = re.match(r"(\w+)\[([\d,]*)\]", shape)
    return _DTYPE_BYTES.get(m.group(1), 4) * math.prod(int(d) for d in m.group(2).split(",") if d)


def host_copy_overlap(hlo_text: str) -> float | None:
    """Of the bytes the scheduled loop bodies of a compiled GPU module copy in from host memory (async
    dynamic-slices of `S(5)` arrays), the fraction whose start and done have a matmul between them.

    The schedule is the order of a computation's instructions in
    `compiled.as_text()`; a copy with a matmul between its start and done
    runs on the copy stream while the tensor cores work. None when no loop
    body copies from host memory.
    """
    total = beside = 0
    for body in re.split(r"\n(?=%|ENTRY)", hlo_text):
        if not body.startswith("%") or "dynamic-slice-start" not in body:
            continue
        lines = body.splitlines()
        matmuls = [i for i, line in enumerate(lines) if _MATMUL.search(line) and "fusion-start" not in line]
        starts: dict[str, int] = {}
        for i, line in enumerate(lines):
            start = re.match(r"\s*%(\S+) = \(\(\S+:S\(5\)\}.*fusion-start\(", line)
            if start and "dynamic-slice" in line:
                starts[start.group(1)] = i
                continue
            done = re.match(r"\s*%\S+ = (\S+) fusion-done\(%(\S+)\)", line)
            if done and done.group(2) in starts:
                nbytes = _shape_bytes(done.group(1))
                total += nbytes
                if any(starts[done.group(2)] < m < i for m in matmuls):
                    beside += nbytes
    return beside / total if total else None


def _cost(compiled: Any, platform: str) -> tuple[float, float]:
    """(flops, bytes accessed) of a compiled module: libtpu answers `cost_analysis()` itself, a GPU module
    through the CPU client (`_cpu_cost`)."""
    if platform == "tpu":
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return _cpu_cost(compiled)


def _cpu_cost(compiled: Any) -> tuple[float, float]:
    """(flops, bytes accessed) of a compiled GPU module through the CPU client's cost analysis.

    `compiled.cost_analysis()` is None for a deviceless compile; this calls
    jaxlib's private `hlo_module_cost_analysis` (the same analysis XLA runs).
    """
    from jax._src.lib import _jax  # private: no public route to it for a deviceless executable

    module = compiled.runtime_executable().hlo_modules()[0]
    cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def compile_for(name: str, fn: Any, args: tuple[Any, ...], mesh: Any = None) -> tuple[Any, float]:
    """(`fn.lower(*args).compile()` for target `name`, seconds); `mesh`: an abstract mesh (default: one device)."""
    mesh = mesh if mesh is not None else abstract_mesh(name)
    start = time.perf_counter()
    with jax.set_mesh(mesh), targeting(get_target(name).platform):  # its choices (qst_jax.platform), on this CPU
        try:
            compiled = fn.lower(*args).compile()
        except jax.errors.JaxRuntimeError as err:
            refusal = _refusal(name, str(err))
            if refusal is None:
                raise
            raise refusal from None
    return compiled, time.perf_counter() - start


_HBM_OOM = re.compile(r"CompileTimeHbmOom.*?required for HLO (\w+) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def _refusal(name: str, message: str) -> DoesNotFit | None:
    """libtpu's compile-time out-of-memory refusal as one line (None for any other compiler error)."""
    found = _HBM_OOM.search(message)
    if found is None:
        return None
    what, need, have = found.groups()
    return DoesNotFit(f"compiled for {name}, not measured: does NOT fit: XLA refuses the program for the chip's "
                      f"memory, its {what} alone need {need} GiB of the {have} GiB of HBM it can use "
                      f"(CompileTimeHbmOom)")


def replicated_on(mesh: Any, tree: Any) -> Any:
    """`tree`'s arrays as ShapeDtypeStructs replicated on `mesh` (what a deviceless compile takes)."""
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def compile_report(name: str, make: Make, *, layers: int, repeats: int = 1, cost: bool = True,
                   dtype: str = "bfloat16", weight_passes: int = 1, mesh: Any = None) -> CompileReport:
    """Compile `make(layers, False)` for target `name` and read its figures (see the module doc).

    `weight_passes`: how often a step reads each streamed layer per
    micro-batch (1 for QST's forward-only backbone; 2 for QLoRA, whose
    checkpointed backward copies each layer in again). `mesh`: the abstract
    mesh `make`'s arguments are sharded over (default: one device).
    """
    fn, args = make(layers, False)
    compiled, seconds = compile_for(name, fn, args, mesh)
    mem = compiled.memory_analysis()
    flops = accessed = None
    if cost:
        with unrolled_loops():
            platform = get_target(name).platform
            one = _cost(compile_for(name, *make(1, True), mesh)[0], platform)
            two = _cost(compile_for(name, *make(2, True), mesh)[0], platform)
        flops, accessed = (repeats * (2 * a - b + layers * (b - a)) for a, b in zip(one, two))
    host = mem.host_argument_size_in_bytes + mem.host_temp_size_in_bytes + mem.host_output_size_in_bytes - \
        mem.host_alias_size_in_bytes
    peak = mem.peak_memory_in_bytes
    if host:  # XLA's peak mixes host bytes in: the device's own fields instead
        peak = mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    # Per micro-batch the host arguments (the layers) come in once a pass, host temporaries (kept states) go out and
    # come back.
    streamed = float(weight_passes * mem.host_argument_size_in_bytes + 2 * mem.host_temp_size_in_bytes) * repeats
    overlapped = host_copy_overlap(compiled.as_text()) if mem.host_argument_size_in_bytes else None
    return CompileReport(get_target(name), seconds, mem.argument_size_in_bytes, mem.output_size_in_bytes,
                         mem.temp_size_in_bytes, mem.alias_size_in_bytes, peak, flops, accessed, dtype, host, streamed,
                         overlapped, 1 if mesh is None else mesh.size)

