"""Compiling for a TPU without one: the targets' published figures, a tiny QST step compiled for a v5e chip
(memory, cost analysis and a roofline from libtpu's compiler), and the one-line refusals."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import optax
import pytest

from qst_jax.aot.targets import TARGETS, AotUnavailable, TpuTarget, target
from qst_jax.environment import libtpu_installed

needs_libtpu = pytest.mark.skipif(not libtpu_installed(), reason="needs libtpu (bash scripts/setup.sh tpu)")


def test_tpu_targets_carry_their_published_figures():
    tpus = {k: (t.memory_gib, t.bf16_tflops, t.bandwidth_bytes_s / 1e9) for k, t in TARGETS.items()
            if isinstance(t, TpuTarget)}
    assert tpus == {"v5e": (16, 197.0, 819.0), "v6e": (32, 918.0, 1640.0), "v5p": (95, 459.0, 2765.0),
                    "v4": (32, 275.0, 1200.0), "v3": (16, 61.5, 450.0)}
    v5e = target("V5E")
    assert v5e.platform == "tpu" and v5e.has_bf16 and v5e.peak_flops("bfloat16") == 197e12
    assert target("h100").platform == "gpu"


def test_a_tpu_slice_it_has_no_topology_for_is_one_line():
    from qst_jax.aot.targets import topology
    from qst_jax.errors import InputError

    with pytest.raises(InputError, match=r"^v5e: no slice of 3 chips; one of \[1, 4, 8, 16\]$"):
        topology("v5e", 3)


def test_without_libtpu_the_planner_says_how_to_get_it(monkeypatch):
    from qst_jax.aot import targets

    monkeypatch.setattr(targets, "libtpu_installed", lambda: False)
    with pytest.raises(AotUnavailable, match=r"^compiling for a TPU needs libtpu: bash scripts/setup.sh tpu"):
        targets.topology("v6e", 16)


@needs_libtpu
def test_a_qst_step_compiles_for_a_v5e_chip():
    """The tiny QST step through libtpu's compiler: device memory, flops from cost analysis at the loops' trip
    counts, a roofline; the TPU's own choices (the states kept in bf16: fp8 is a GPU's)."""
    from qst_jax.aot.compile import compile_report, replicated_on
    from qst_jax.aot.targets import abstract_mesh
    from qst_jax.methods import QSTModel, SideConfig
    from qst_jax.methods.downsamplers import resolve_store
    from qst_jax.platform import targeting
    from qst_jax.models.random_init import llama2_config, random_params
    from qst_jax.train.step import init_train_state, make_train_step

    mesh = abstract_mesh("v5e")
    assert mesh.devices.flat[0].device_kind == "TPU v5 lite"

    def make(layers: int, for_cost: bool):
        cfg = dataclasses.replace(llama2_config("tiny"), num_layers=layers)
        model, tx = QSTModel(cfg, SideConfig()), optax.adamw(1e-3)
        backbone = replicated_on(mesh, jax.eval_shape(lambda k: random_params(cfg, k), jax.random.PRNGKey(0)))
        state = replicated_on(mesh, jax.eval_shape(lambda: init_train_state(model, tx, jax.random.PRNGKey(0))))
        ids = jax.ShapeDtypeStruct((1, 8, 128), jnp.int32)
        batch = replicated_on(mesh, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids})
        return make_train_step(model, tx), (state, backbone, batch)

    report = compile_report("v5e", make, layers=4)
    assert report.target.name == "v5e" and report.fits and 0 < report.peak_bytes < 2**28
    assert report.flops > 0 and report.bytes_accessed > 0 and report.roofline_s > 0
    assert "compiled for v5e (TPU v5 lite, 16.0 GiB), not measured" in report.lines()
    with targeting("tpu"):
        assert resolve_store("auto") == "compute"


@needs_libtpu
def test_a_v4_chip_is_one_device_as_jax_runs_it():
    """libtpu's default v4 topology has a device per TensorCore; JAX runs a v4 in megacore mode (one device a
    chip, 32 GiB), so the target asks for that chip configuration, and a program compiles over it."""
    from qst_jax.aot.compile import compile_report, replicated_on
    from qst_jax.aot.targets import abstract_mesh, topology

    assert [len(topology("v4", n).devices) for n in (1, 4)] == [1, 4]
    mesh = abstract_mesh("v4", (4,))
    assert {d.device_kind for d in mesh.devices.flat} == {"TPU v4"}

    def make(layers: int, for_cost: bool):
        x = replicated_on(abstract_mesh("v4"), jax.ShapeDtypeStruct((1024, 1024 * layers), jnp.bfloat16))
        return jax.jit(lambda a: a @ a.T), (x,)

    report = compile_report("v4", make, layers=1, cost=False)
    assert report.fits and 2 * 2**20 <= report.peak_bytes < 2**26
    assert "compiled for v4 (TPU v4, 32.0 GiB), not measured" in report.lines()


@needs_libtpu
def test_a_v3_device_is_one_core_of_a_chip():
    """JAX runs each TensorCore of a v3 chip as a device of 16 GiB (Kaggle's v3-8 is 8 of them): one device is the
    first core of a chip, a v3-8 slice is 8."""
    from qst_jax.aot.compile import compile_report, replicated_on
    from qst_jax.aot.targets import abstract_mesh
    from qst_jax.errors import InputError

    assert [abstract_mesh("v3", (n,)).size for n in (1, 8)] == [1, 8]
    assert {d.device_kind for d in abstract_mesh("v3", (8,)).devices.flat} == {"TPU v3"}

    def make(layers: int, for_cost: bool):
        x = replicated_on(abstract_mesh("v3"), jax.ShapeDtypeStruct((1024, 1024 * layers), jnp.bfloat16))
        return jax.jit(lambda a: a @ a.T), (x,)

    report = compile_report("v3", make, layers=1, cost=False)
    assert report.fits and "compiled for v3 (TPU v3, 16.0 GiB), not measured" in report.lines()
    with pytest.raises(InputError, match=r"^v3: no slice of 4 devices \(TensorCores\); one of \[1, 2, 8, 32\]$"):
        abstract_mesh("v3", (4,))


def test_libtpu_without_a_tpu_device(monkeypatch):
    """What the package root reads to keep jax off a TPU that is not there (JAX_PLATFORMS=cpu)."""
    from qst_jax import environment

    monkeypatch.setattr(environment, "libtpu_installed", lambda: True)
    monkeypatch.setattr(environment.glob, "glob", lambda pattern: [])
    assert environment.libtpu_without_tpu()
    monkeypatch.setattr(environment.glob, "glob", lambda pattern: ["/dev/accel0"] if "accel" in pattern else [])
    assert not environment.libtpu_without_tpu()
    monkeypatch.setattr(environment, "libtpu_installed", lambda: False)
    monkeypatch.setattr(environment.glob, "glob", lambda pattern: [])
    assert not environment.libtpu_without_tpu()


@needs_libtpu
def test_a_sharded_plan_compiles_over_a_v5e_slice():
    """parallel.fsdp=4 --plan v5e: qst-train's sharded step over four v5e chips; each holds a quarter of the
    backbone (the partition rules), and the report says its figures are per device."""
    from qst_jax.models.random_init import random_params
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import model_config, plan_run

    c = load_preset(str(pathlib.Path(__file__).parents[2] / "configs" / "default.py"), "default")
    c.parallel.fsdp, c.train.batch_size, c.data.seq_len = 4, 4, 64
    report, notes = plan_run(c, "v5e", cost=False)
    cfg = model_config(c)
    backbone = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        jax.eval_shape(lambda k: random_params(cfg, k), jax.random.PRNGKey(0))))
    assert report.devices == 4 and report.fits
    assert backbone / 4 <= report.argument_bytes < backbone / 2  # split four ways, plus the side state and batch
    assert "over a 1 x 4 x 1 (data x fsdp x tensor) mesh of v5e" in notes[-1]
    assert report.lines().startswith("compiled for v5e x 4 (per device) (TPU v5 lite, 16.0 GiB), not measured")
    c.model.offload = "weights"
    with pytest.raises(ValueError, match=r"^--plan over a mesh of 4 devices: a single-device run only for "
                                         r"model.offload, as qst-train runs it$"):
        plan_run(c, "v5e", cost=False)


@needs_libtpu
def test_a_program_too_big_for_the_chip_is_one_line():
    """libtpu refuses a program whose temporaries exceed the chip's HBM at compile time (CompileTimeHbmOom, a
    JaxRuntimeError of many lines); the planner says it in one line, as a GPU plan's "does NOT fit"."""
    from qst_jax.aot.compile import compile_for, replicated_on
    from qst_jax.aot.targets import DoesNotFit, abstract_mesh

    x = replicated_on(abstract_mesh("v5e"), jax.ShapeDtypeStruct((80_000,), jnp.float32))
    outer = jax.jit(lambda v: jnp.outer(v, v) + jnp.outer(v, v).T)  # two 23.8 GiB temporaries
    with pytest.raises(DoesNotFit, match=r"^compiled for v5e, not measured: does NOT fit: XLA refuses the program "
                                         r"for the chip's memory, its temporaries alone need [\d.]+ GiB of the "
                                         r"15.75 GiB of HBM it can use \(CompileTimeHbmOom\)$"):
        compile_for("v5e", outer, (x,))


@needs_libtpu
def test_a_streamed_backbone_compiles_for_a_v5e_chip():
    """model.offload="weights" --plan v5e: libtpu copies one layer of a host stack only when the stack is row-major
    and (8, 128)-tiled, and refuses its default host layout for NF4 codes (a RET_CHECK naming u8[1, ...]); the
    layers' 3-D leaves go to the host in that layout (`models.host_layers`), the rest stays on the device."""
    from qst_jax.models.random_init import random_params
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import model_config, plan_run

    c = load_preset(str(pathlib.Path(__file__).parents[2] / "configs" / "default.py"), "default")
    c.model.offload = "weights"
    streamed, _ = plan_run(c, "v5e", cost=False)
    layers = jax.eval_shape(lambda k: random_params(model_config(c), k), jax.random.PRNGKey(0))["layers"]
    stacks = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(layers) if x.ndim >= 3)
    # the 3-D leaves, and only they (a tiled layout pads a small minor dimension, e.g. absmax [30, 576, 9], to 128)
    assert streamed.fits and stacks <= streamed.host_bytes < 2 * stacks


@needs_libtpu
@pytest.mark.slow
def test_the_70b_recipe_fits_8_gib_a_chip_of_a_v5e_8():
    """configs/chat_70b_fsdp8.py --plan v5e: the side state split over the chips and each layer's NF4 codes relaid
    in the loop (not a copy of every stack at once) keep a chip at most 8 GiB (it was 15.63)."""
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import plan_run

    c = load_preset(str(pathlib.Path(__file__).parents[2] / "configs" / "chat_70b_fsdp8.py"), "chat_70b_fsdp8")
    report, _ = plan_run(c, "v5e", cost=False)
    assert report.devices == 8 and report.argument_bytes < 5 * 2**30  # 4.25 GiB of the backbone's codes a chip
    assert report.peak_bytes <= 8 * 2**30, report.lines()


@needs_libtpu
@pytest.mark.slow
def test_70b_with_its_layers_and_states_on_the_host_fits_one_v5e_chip():
    """configs/chat_70b_16gb.py --plan v5e: LLaMA-2-70B QST at B16 x T512, the layers and the kept fp8 states in
    pinned host memory, fits a v5e chip's 15.75 GiB (the NF4 weights dequantized in their even-odd column order;
    interleaved, XLA asked 30.53 GiB of temporaries for the layers-only stream)."""
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import plan_run

    c = load_preset(str(pathlib.Path(__file__).parents[2] / "configs" / "chat_70b_16gb.py"), "chat_70b_16gb")
    report, _ = plan_run(c, "v5e", cost=False)
    assert report.fits and report.peak_bytes < 13 * 2**30, report.lines()
    assert 35 * 2**30 < report.host_bytes < 40 * 2**30  # 32.9 GiB of layers (tile-padded) and 5 GiB of states
