"""benchmarks/studies/probe_layers.py: per-layer features and the logistic-regression probe."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qst_jax.models import load_backbone
from qst_jax.models.decoder import forward
from tests.helpers import study


def test_last_layer_features_are_the_backbones_final_states(testdata):
    backbone = load_backbone(testdata / "tiny-llama-nf4", dtype=jnp.float32)
    rows = [[5, 9, 13, 2, 7], [11, 4], [3, 8, 6]]
    last, mean = study("probe_layers").layer_features(backbone, rows, seq_len=8, batch=2)
    layers, d = backbone.cfg.num_layers, backbone.cfg.hidden_size
    assert last.shape == mean.shape == (layers, 3, d)
    for i, ids in enumerate(rows):
        final, _ = forward(backbone.params, backbone.cfg, jnp.asarray([ids]), dtype=jnp.float32)
        np.testing.assert_allclose(last[-1, i], np.asarray(final[0, -1]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mean[-1, i], np.asarray(final[0]).mean(0), rtol=1e-4, atol=1e-4)


def test_probe_separates_what_is_separable_and_not_noise():
    probe = study("probe_layers").probe_accuracy
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = (x[:, 2] - 0.5 * x[:, 5] > 0).astype(int)
    assert probe(x[:300], y[:300], x[300:], y[300:], l2=1e-3, iterations=50) > 0.95
    noise = rng.integers(0, 2, 400)
    assert probe(x[:300], noise[:300], x[300:], noise[300:], l2=1e-3, iterations=50) < 0.65


def test_every_layer_puts_each_rows_states_side_by_side():
    last = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # [L, N, d]
    mean = -last
    both = study("probe_layers").every_layer(last, mean)
    assert both.shape == (3, 16)
    np.testing.assert_array_equal(both[1], np.concatenate([last[0, 1], last[1, 1], mean[0, 1], mean[1, 1]]))
