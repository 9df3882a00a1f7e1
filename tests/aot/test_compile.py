"""GPU programs compiled for real GPU targets on the CPU (deviceless AOT): memory bounds from the shapes, the
fused kernel's Triton call, the trip-count scaling of the cost, the planner. Skips only without the CUDA plugin."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

from qst_jax.aot.targets import TARGETS, plugin_installed, target

pytestmark = pytest.mark.skipif(not plugin_installed(), reason="needs the CUDA plugin (bash scripts/setup.sh aot)")

from qst_jax.aot.compile import compile_for, compile_report, replicated_on  # noqa: E402
from qst_jax.aot.targets import abstract_mesh  # noqa: E402
from qst_jax.methods import QSTModel, SideConfig  # noqa: E402
from qst_jax.models.loops import unrolled_loops  # noqa: E402
from qst_jax.models.random_init import llama2_config, random_params  # noqa: E402
from qst_jax.train.step import init_train_state, make_train_step  # noqa: E402

REPO = pathlib.Path(__file__).parents[2]
B, T, LAYERS = 16, 128, 8
CFG = dataclasses.replace(llama2_config("tiny"), num_layers=LAYERS)  # d 256, I 704, 8 heads, vocab 1024


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _qst_step(name: str = "h100", batch: int = B, seq: int = T, **options):
    """`make(layers, for_cost)` of a QST train step on the tiny LLaMA shape, batch x seq tokens."""
    mesh = abstract_mesh(name)

    def make(layers: int, for_cost: bool):
        cfg = dataclasses.replace(CFG, num_layers=layers)
        side = SideConfig(downsampler=options.get("downsampler", "adapter"))
        model = QSTModel(cfg, side, **{k: v for k, v in options.items() if k != "downsampler"})
        tx = optax.adamw(1e-3)
        backbone = replicated_on(mesh, jax.eval_shape(lambda k: random_params(cfg, k), jax.random.PRNGKey(0)))
        state = replicated_on(mesh, jax.eval_shape(lambda: init_train_state(model, tx, jax.random.PRNGKey(0))))
        ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
        batch_shapes = replicated_on(mesh, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids})
        return make_train_step(model, tx), (state, backbone, batch_shapes)

    return make


@pytest.fixture(scope="module")
def reports():
    return {key: compile_report("h100", _qst_step(**opts), layers=LAYERS, cost=False) for key, opts in {
        "default": {}, "maxpool": {"downsampler": "maxpool"},
        "bf16-states": {"hidden_store": "compute"}, "old-default": {"hidden_store": "compute", "remat_side": False},
    }.items()}


def test_the_default_qst_step_stays_below_a_bound_from_its_shapes(reports):
    """Peak <= arguments + what the backward must keep + one layer's working set (+20%)."""
    d, i, v, heads = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size, CFG.num_heads
    w = d // 16
    make = _qst_step()
    state, backbone, _ = make(LAYERS, False)[1]
    kept = LAYERS * B * T * d * 1 + 2 * LAYERS * B * T * w * 2  # fp8 h_i; each side layer's D_i(h_i) and s_{i-1}
    layer = (B * T * (4 * d + 3 * i) * 2  # one layer's activations, bf16
             + B * heads * T * T * (4 + 2 + 1)  # its attention scores (f32, bf16, mask)
             + (4 * d * d + 3 * d * i) * 2)  # its dequantized weights
    logits = 1024 * v * 4 * 3  # one cross-entropy chunk's f32 logits, softmax and gradient
    grads = _nbytes(state.params)
    bound = _nbytes(backbone) + _nbytes(state) + 1.2 * (kept + layer + logits + grads)
    assert reports["default"].peak_bytes <= bound, (reports["default"].peak_bytes, bound)


def test_fp8_states_and_side_remat_save_what_they_promise(reports):
    states_bf16 = LAYERS * B * T * CFG.hidden_size * 2
    # fp8 keeps half of bf16's bytes of every h_i (it once saved nothing: the remat boundary kept a bf16 copy)
    assert reports["bf16-states"].temp_bytes - reports["default"].temp_bytes >= 0.4 * states_bf16
    assert reports["old-default"].temp_bytes > reports["bf16-states"].temp_bytes
    # pooling keeps no h_i at all
    assert reports["default"].temp_bytes - reports["maxpool"].temp_bytes >= 0.4 * states_bf16 / 2


def test_the_cost_counts_every_layer_and_loop():
    """a + L * b from the one- and two-layer programs equals the L-layer program compiled unrolled."""
    layers, batch, seq = 3, 4, 64
    make = _qst_step(batch=batch, seq=seq)
    report = compile_report("h100", make, layers=layers)
    with unrolled_loops():
        from qst_jax.aot.compile import _cpu_cost

        flops, accessed = _cpu_cost(compile_for("h100", *make(layers, True))[0])
    assert report.flops == pytest.approx(flops, rel=1e-3)
    assert report.bytes_accessed == pytest.approx(accessed, rel=0.05)
    # a forward and a backward over 2 * params * tokens at least: the trip counts are in
    per_layer = 2 * batch * seq * (4 * CFG.hidden_size**2 + 3 * CFG.hidden_size * CFG.intermediate_size)
    assert report.flops > layers * per_layer
    assert report.roofline_s == max(report.flops / 989e12, report.bytes_accessed / 3.35232e12)


@pytest.mark.parametrize("name", ["h100", "a100-80", "l4"])
def test_the_fused_nf4_kernel_compiles_to_a_triton_call(name):
    from qst_jax.quant import quantize
    from qst_jax.quant.nf4_kernel import nf4_matmul

    mesh = abstract_mesh(name)
    w = replicated_on(mesh, jax.eval_shape(quantize, jax.ShapeDtypeStruct((11008, 4096), jnp.float32)))
    x = replicated_on(mesh, jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16))
    compiled, _ = compile_for(name, nf4_matmul, (x, w), mesh)
    assert "triton" in compiled.as_text()


def test_a_t4_refuses_the_triton_kernel_and_takes_the_reference_path():
    from qst_jax.quant import quantize
    from qst_jax.quant.matmul import triton_capable
    from qst_jax.quant.nf4_kernel import nf4_matmul

    mesh = abstract_mesh("t4")
    w = replicated_on(mesh, jax.eval_shape(quantize, jax.ShapeDtypeStruct((4096, 4096), jnp.float32)))
    x = replicated_on(mesh, jax.ShapeDtypeStruct((16, 4096), jnp.float16))
    with pytest.raises(Exception, match="compute capability 8.0"):
        compile_for("t4", nf4_matmul, (x, w), mesh)
    assert not triton_capable("7.5") and triton_capable("8.0") and triton_capable("9.0")


def test_bf16_falls_back_to_float16_on_a_t4_and_the_step_compiles():
    from qst_jax.train.plan import compute_dtype
    from qst_jax.train.config import base_config

    dtype, note = compute_dtype(base_config(), "t4")
    assert dtype == jnp.float16 and note == "t4 has no bfloat16: computing in float16 (model.dtype=float16)"
    assert compute_dtype(base_config(), "h100") == (jnp.bfloat16, None)
    report = compile_report("t4", _qst_step("t4", dtype=jnp.float16), layers=2, cost=False)
    assert report.fits and report.peak_bytes > 0


def test_every_target_has_its_published_memory():
    assert {k: round(t.memory_gib) for k, t in TARGETS.items()} == {
        "t4": 15, "l4": 22, "rtx4090": 24, "rtx3090": 24, "rtx4060ti-16": 16, "a100-40": 39, "a100-80": 79,
        "h100": 79, "h200": 141, "v5e": 16, "v6e": 32, "v5p": 95, "v4": 32, "v3": 16}
    assert {k: t.host_link_bytes_s / 1e9 for k, t in TARGETS.items() if k.startswith("rtx")} == {
        "rtx4090": 31.5, "rtx3090": 31.5, "rtx4060ti-16": 15.75}  # PCIe Gen4 x16, x16, x8
    with pytest.raises(ValueError, match="--plan 'v100': not a known GPU or TPU; one of t4, l4, rtx4090, rtx3090"):
        target("v100")


def test_qst_train_plan_prints_the_compiled_peak_without_reading_weights(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qst_jax.cli.train", "--config", "configs/chat_70b.py", "--plan", "h100",
         "--config.model.path=smollm2", "--config.train.micro_batches=2", "--config.train.batch_size=2",
         "--config.data.seq_len=64", f"--config.train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "planning qst on llama (30 layers, hidden 576), batch 2 x 2 x 64, no weights read" in out.stdout
    assert "compiled for h100 (NVIDIA H100 80GB HBM3, 79.1 GiB), not measured" in out.stdout
    assert "fits in 79.1 GiB" in out.stdout and "roofline ESTIMATE" in out.stdout
    assert not (tmp_path / "run").exists()


def test_a_plan_beyond_the_models_context_is_refused():
    from qst_jax.models import ConfigError
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import plan_run

    c = load_preset(str(REPO / "configs" / "default.py"), "default")
    c.data.seq_len = 16384  # SmolLM2-135M has 8192 positions
    with pytest.raises(ConfigError, match=r"data.seq_len: 16384 exceeds the model's context of 8192 positions$"):
        plan_run(c, "l4", cost=False)


def test_a_streamed_backbone_is_host_memory_not_device(tmp_path):
    """model.offload=weights: the planner's step reads the layers from pinned host memory; the device peak drops
    by at least the layers' bytes, which the host column holds; weights+states also moves the states the backward
    keeps (compiled for an L4, tiny shape)."""
    from qst_jax.data.specs import resolve_model_path
    from qst_jax.models import load_config
    from qst_jax.train.config import load_preset
    from qst_jax.train.plan import plan_run

    plans = {}
    for offload in ("none", "weights", "weights+states"):
        c = load_preset(str(REPO / "configs" / "chat_70b.py"), "chat_70b")
        c.model.path, c.model.offload = "smollm2", offload
        c.train.batch_size, c.train.micro_batches, c.data.seq_len = 2, 1, 64
        plans[offload] = plan_run(c, "l4", cost=False)[0]
    cfg = load_config(resolve_model_path("smollm2"))
    layers = _nbytes(jax.eval_shape(lambda k: random_params(cfg, k), jax.random.PRNGKey(0))["layers"])
    resident, streamed = plans["none"], plans["weights"]
    assert resident.host_bytes == 0 and streamed.host_bytes == layers
    assert streamed.peak_bytes <= resident.peak_bytes - 0.9 * layers
    assert "host (pinned)" in streamed.lines() and "host (pinned)" not in resident.lines()
    # The next layer's copies run beside this layer's matmuls in the compiled schedule (loops.STREAMING_XLA_OPTIONS).
    assert resident.copies_overlapped is None and streamed.copies_overlapped == 1.0
    assert "host copies       100% of a layer's bytes scheduled beside a matmul" in streamed.lines()
    states = plans["weights+states"]  # fp8 states of 30 layers x 2 x 64 tokens x 576 wide, and their scales
    assert states.host_bytes > layers and states.peak_bytes < streamed.peak_bytes
    assert states.streamed_bytes > streamed.streamed_bytes


def test_fit_table_rows_and_table(capsys):
    """scripts/fit_table.py on one recipe: one compile per architecture, a mesh recipe pointed elsewhere."""
    from tests.helpers import script

    module = script("fit_table")
    records = module.main(["--only", "glue_sst2,fsdp2", "--targets", "t4,h100,h200"])
    compiled = [r for r in records if "peak_bytes" in r]
    assert [(r["row"], r["arch"], r["targets"]) for r in compiled] == [
        ("configs/glue_sst2.py", "sm_90", ["h200", "h100"]), ("configs/glue_sst2.py", "sm_75", ["t4"])]
    assert all(0 < r["peak_bytes"] < 2**30 for r in compiled)  # a 135M backbone at 4 x 128
    assert "t4 has no bfloat16: computing in float16 (model.dtype=float16)" in compiled[1]["notes"]
    assert {"row": "configs/chat_70b_fsdp2.py", "mesh": "data 1 x fsdp 2 x tensor 1"} in records
    out = capsys.readouterr().out
    assert "| configs/glue_sst2.py | " in out and " fits |" in out and "mesh (data 1 x fsdp 2" in out


def test_the_decode_step_compiles_for_a_t4():
    """One query in float16 on sm_75: XLA refuses jax.nn.dot_product_attention there; the einsum form compiles."""
    from tests.helpers import script

    module = script("compile_for_gpu")
    for rows in (1, 16):
        report = compile_report("t4", module.program(f"decode:{rows}", "tiny", 1, 64, "t4"), layers=4, cost=False,
                                dtype="float16")
        assert 0 < report.peak_bytes < 2**27


@pytest.mark.parametrize("offload, method, hint", [
    ("none", "qst", "to fit: --config.model.offload=weights keeps the frozen layers in pinned host memory"),
    ("weights", "qst", "to fit: --config.model.offload=weights+states also keeps the backbone states"),
    ("weights", "qlora", None),
    ("weights+states", "qst", None),
])
def test_a_plan_that_does_not_fit_names_the_offload_that_keeps_more_on_the_host(monkeypatch, capsys, offload,
                                                                                 method, hint):
    """`qst-train --plan` refused for memory (libtpu's one line) prints the next model.offload, exit 0."""
    from qst_jax.aot.targets import DoesNotFit
    from qst_jax.cli import train as cli
    from qst_jax.train import plan
    from qst_jax.train.config import load_preset

    refusal = "compiled for v5e, not measured: does NOT fit: XLA refuses the program for the chip's memory"

    def refuse(config, name, cost=True):
        raise DoesNotFit(refusal)

    monkeypatch.setattr(plan, "plan_run", refuse)
    c = load_preset(str(REPO / "configs" / "default.py"), "default")
    c.model.offload, c.method = offload, method
    assert cli._plan(c, "v5e") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == refusal
    assert (lines[1:] == []) if hint is None else lines[1].startswith(hint)
