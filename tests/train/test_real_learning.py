"""Real learning on real text: SmolLM2-135M-Instruct (NF4) on Shakespeare."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from qst_jax.data.offline import MissingPackageError

pytestmark = pytest.mark.slow
REPO = pathlib.Path(__file__).parents[2]


def test_qst_lowers_held_out_perplexity_and_qlora_is_printed(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("compare_qlora", REPO / "scripts" / "compare_qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        # QLoRA's steps cost about 3x QST's on CPU; 8 of them already beat the frozen backbone.
        rows = module.compare(str(REPO / "configs" / "default.py"), steps=24, output_root=str(tmp_path),
                              eval_examples=16, qlora_steps=8)
    except MissingPackageError as err:
        pytest.skip(str(err))
    qst, qlora = rows
    frozen = qst["frozen"]
    print(f"frozen backbone {frozen:.2f}; QST {qst['after']:.2f}; QLoRA {qlora['after']:.2f}")
    assert qlora["frozen"] == pytest.approx(frozen, rel=1e-6)  # same frozen model, same data
    assert qlora["at_init"] == pytest.approx(frozen, rel=1e-3)  # LoRA's B = 0: starts at the backbone
    assert qst["after"] < 0.93 * frozen  # 24 steps; the 200-step default goes much lower
    assert qlora["after"] < frozen
    assert qst["params"] < qlora["params"] * 2  # both small; QST's count is printed by the run
