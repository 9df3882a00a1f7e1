"""NF4 quantization against golden tensors written by bitsandbytes' CUDA kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qst_jax.quant import NF4Weight, QuantizationError, bits_per_parameter, quantize
from qst_jax.quant.nf4 import DYNAMIC_MAP, NF4_TABLE

NAMES = ["t0", "t1", "t2", "t3"]
quantize_jit = jax.jit(quantize, static_argnames=("blocksize", "double_quant", "name"))


@pytest.fixture(scope="module")
def golden(testdata):
    return dict(np.load(testdata / "nf4-tensors.npz"))


def _weight(golden, name):
    return golden[f"{name}_weight_bf16_u16"].view(ml_dtypes.bfloat16)


def _bnb_weight(golden, name, nested=True):
    out_dim, in_dim = golden[f"{name}_weight_bf16_u16"].shape
    if nested:
        return NF4Weight(
            packed=jnp.asarray(golden[f"{name}_packed"].reshape(out_dim, -1)),
            absmax=jnp.asarray(golden[f"{name}_absmax_u8"].reshape(out_dim, -1)),
            nested_absmax=jnp.asarray(golden[f"{name}_nested_absmax"]),
            offset=jnp.asarray(golden[f"{name}_nested_offset"]),
            shape=(out_dim, in_dim),
        )
    return NF4Weight(
        packed=jnp.asarray(golden[f"{name}_plain_packed"].reshape(out_dim, -1)),
        absmax=jnp.asarray(golden[f"{name}_plain_absmax_f32"].reshape(out_dim, -1)),
        nested_absmax=None,
        offset=None,
        shape=(out_dim, in_dim),
    )


def test_nested_code_table_is_bitsandbytes(golden):
    for name in NAMES:
        np.testing.assert_array_equal(golden[f"{name}_nested_code"], DYNAMIC_MAP)
    assert np.all(np.diff(NF4_TABLE) > 0) and NF4_TABLE[7] == 0.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
def test_double_quant_matches_bitsandbytes(golden, name, jitted):
    q = (quantize_jit if jitted else quantize)(_weight(golden, name))
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), golden[f"{name}_packed"])
    assert np.asarray(q.offset).tobytes() == golden[f"{name}_nested_offset"].astype(np.float32).tobytes()
    np.testing.assert_array_equal(np.asarray(q.nested_absmax), golden[f"{name}_nested_absmax"])
    ours = np.asarray(q.absmax).reshape(-1).astype(np.int32)
    theirs = golden[f"{name}_absmax_u8"].astype(np.int32)
    mismatched = np.flatnonzero(ours != theirs)
    # Only exact ties between two map entries may be broken differently, by one code.
    assert np.all(np.abs(ours[mismatched] - theirs[mismatched]) <= 1)
    assert mismatched.size == 0, f"{mismatched.size} nested codes differ (ties)"


@pytest.mark.parametrize("name", NAMES)
def test_plain_quant_matches_bitsandbytes(golden, name):
    q = quantize_jit(_weight(golden, name), double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.packed).reshape(-1), golden[f"{name}_plain_packed"])
    assert np.asarray(q.absmax).dtype == np.float32
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), golden[f"{name}_plain_absmax_f32"])


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_bnb_bytes_bit_exact(golden, name):
    deq = np.asarray(jax.jit(lambda w: w.dequantize(jnp.bfloat16))(_bnb_weight(golden, name)))
    np.testing.assert_array_equal(deq.view(np.uint16), golden[f"{name}_dequant_bf16_u16"])


@pytest.mark.parametrize("name", NAMES)
def test_plain_dequantize_is_code_times_scale(golden, name):
    w = _bnb_weight(golden, name, nested=False)
    deq = np.asarray(w.dequantize(jnp.float32))
    codes = np.asarray(w.codes()).reshape(w.shape[0], -1, 64)
    expected = NF4_TABLE[codes] * np.asarray(w.absmax)[..., None]
    np.testing.assert_array_equal(deq, expected.reshape(w.shape))


def test_all_zero_block(golden):
    w = _weight(golden, "t2")
    assert np.all(np.asarray(w[0, :64], np.float32) == 0)
    # Without double quantization the block's scale is 0: it dequantizes to zeros.
    q = quantize(w, double_quant=False)
    assert np.all(np.asarray(q.codes())[0, :64] == 0)  # the CUDA kernel's code
    assert float(q.absmax[0, 0]) == 0.0
    assert np.all(np.asarray(q.dequantize(jnp.float32))[0, :64] == 0)
    # bitsandbytes' CPU backend writes code 7 instead; it must read as zero too.
    packed = np.asarray(q.packed).copy()
    packed[0, :32] = 0x77
    q7 = NF4Weight(jnp.asarray(packed), q.absmax, None, None, shape=q.shape)
    assert np.all(np.asarray(q7.dequantize(jnp.float32))[0, :64] == 0)
    # With double quantization the zero scale is itself 8-bit coded around the
    # mean, so bitsandbytes (and qst_jax, bit for bit) reads the block back as
    # -1 x (a tiny nonzero scale): not zero, but within one nested step of it.
    qd = quantize(w)
    assert np.all(np.asarray(qd.codes())[0, :64] == 0)
    deq = np.asarray(qd.dequantize(jnp.bfloat16)).view(np.uint16)
    np.testing.assert_array_equal(deq[0, :64], golden["t2_dequant_bf16_u16"][0, :64])
    scale0 = float(qd.scales()[0, 0])
    step = float(qd.nested_absmax[0]) * float(np.max(np.diff(DYNAMIC_MAP)))
    assert abs(scale0) <= step


def test_outlier_is_exact(golden):
    w = _weight(golden, "t2")
    assert float(w[1, 5]) == 40.0
    deq = np.asarray(quantize(w).dequantize(jnp.float32))
    assert abs(deq[1, 5] - 40.0) < 0.2  # the block max, coded by the 8-bit nested map


def test_first_element_in_high_nibble():
    w = np.zeros((1, 64), np.float32)
    w[0, 0], w[0, 1] = -1.0, 1.0  # codes 0 and 15
    q = quantize(w, double_quant=False)
    assert int(q.packed[0, 0]) == 0x0F


def test_ties_take_lower_code():
    # A value exactly on the midpoint between codes 7 (0.0) and 8 takes code 7.
    thr = np.float32((np.float64(NF4_TABLE[7]) + NF4_TABLE[8]) / 2)
    w = np.zeros((1, 64), np.float32)
    w[0, 0], w[0, 1], w[0, 2] = 1.0, thr, np.nextafter(thr, np.float32(1))
    codes = np.asarray(quantize(w, double_quant=False).codes())[0]
    assert list(codes[:3]) == [15, 7, 8]


def test_stacked_leading_axes_dequantize_per_layer():
    rng = np.random.default_rng(0)
    ws = rng.standard_normal((3, 32, 128)).astype(np.float32)
    qs = [quantize(w) for w in ws]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *qs)
    assert stacked.lead_shape == (3,)
    deq = np.asarray(stacked.dequantize(jnp.float32))
    for i, q in enumerate(qs):
        np.testing.assert_array_equal(deq[i], np.asarray(q.dequantize(jnp.float32)))


def test_bits_per_parameter_4096():
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    q = jax.eval_shape(lambda x: quantize(x), w)
    assert bits_per_parameter(q) == pytest.approx(4.127, abs=5e-4)
    q_plain = jax.eval_shape(lambda x: quantize(x, double_quant=False), w)
    assert bits_per_parameter(q_plain) == pytest.approx(4.5)


def test_grad_wrt_nf4_weight_raises():
    q = quantize(np.ones((8, 64), np.float32))
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(TypeError, match="uint8"):
        jax.grad(lambda w: jnp.sum(x @ w.dequantize(jnp.float32).T))(q)


@pytest.mark.parametrize(
    "shape, match",
    [((8, 96), "not a multiple of the blocksize"), ((8,), "2-D"), ((0, 64), "empty")],
)
def test_bad_shapes_raise(shape, match):
    with pytest.raises(QuantizationError, match=match):
        quantize(np.ones(shape, np.float32), name="layer.q_proj")


def test_odd_blocksize_raises():
    with pytest.raises(QuantizationError, match="even"):
        quantize(np.ones((3, 63), np.float32), blocksize=63)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises_with_name(bad):
    w = np.ones((4, 64), np.float32)
    w[2, 3] = bad
    with pytest.raises(QuantizationError, match=r"layer\.q_proj: 1 non-finite value.*\(2, 3\)"):
        quantize(w, name="layer.q_proj")
