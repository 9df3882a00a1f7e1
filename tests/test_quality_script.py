"""benchmarks/studies/quality.py: the LoRA-depth variants' update mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.helpers import study


def test_only_the_last_layers_lora_updates_pass():
    mask = study("quality")._only_last_layers(2)
    updates = {
        "lora": {"attn": {"q": {"a": jnp.ones((5, 3, 4)), "b": jnp.full((5, 4, 3), 2.0)}}},
        "score": {"w": jnp.full((2, 4), 3.0)},
    }
    out, _ = mask.update(updates, mask.init(updates))
    a, b = out["lora"]["attn"]["q"]["a"], out["lora"]["attn"]["q"]["b"]
    np.testing.assert_array_equal(a[:3], 0.0)
    np.testing.assert_array_equal(b[:3], 0.0)
    np.testing.assert_array_equal(a[3:], 1.0)
    np.testing.assert_array_equal(b[3:], 2.0)
    np.testing.assert_array_equal(out["score"]["w"], 3.0)  # not a LoRA leaf: untouched
