"""QST vs the QLoRA baseline with the same step budget, on the embedded default.

    python scripts/compare_qlora.py [--steps 200] [--config configs/default.py]

Runs `configs/default.py` (SmolLM2-135M-Instruct NF4 on Shakespeare, Hamlet
held out) twice, as QST and as QLoRA (LoRA rank 16 on every linear, gradients
through the backbone, rematerialised), and prints held-out perplexity of the
frozen backbone, of each method at initialisation and after training, the
trainable parameters and the run time of both.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("qst_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def compare(config_path: str, steps: int, output_root: str, eval_examples: int | None = None, log=print,
            qlora_steps: int | None = None, backbone=None, tokenizer=None):
    """Rows of held-out perplexity for QST then QLoRA (`qlora_steps` defaults to `steps`).

    `backbone` and `tokenizer`, when given, are the loaded `config.model.path`
    (else it is loaded once for both runs).
    """
    from qst_jax.train.trainer import Trainer

    rows = []
    for method in ("qst", "qlora"):
        config = load_config(config_path)
        config.method = method
        config.train.steps = steps if method == "qst" or qlora_steps is None else qlora_steps
        config.train.eval_every = 0
        config.train.checkpoint_every = 0
        config.train.output_dir = os.path.join(output_root, method)
        if eval_examples:
            config.data.eval_examples = eval_examples
        trainer = Trainer(config, backbone=backbone, tokenizer=tokenizer, overwrite=True, log=log)
        backbone, tokenizer = trainer.backbone, trainer.tokenizer
        start = time.perf_counter()
        summary = trainer.run()
        seconds = time.perf_counter() - start
        rows.append(
            dict(
                method=method,
                params=summary["trainable_params"],
                frozen=summary["eval_frozen"]["perplexity"],
                at_init=summary["eval_before"]["perplexity"],
                after=summary["eval_after"]["perplexity"],
                seconds=seconds,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output", default="runs/compare")
    args = parser.parse_args()
    rows = compare(args.config, args.steps, args.output)
    print(f"\nheld-out perplexity after {args.steps} steps (same data, same budget)")
    print(f"{'method':<7} {'trainable':>11} {'frozen':>8} {'at init':>8} {'after':>8} {'run s':>7}")
    for r in rows:
        print(
            f"{r['method']:<7} {r['params']:>11,} {r['frozen']:>8.2f} {r['at_init']:>8.2f} {r['after']:>8.2f} "
            f"{r['seconds']:>7.0f}"
        )


if __name__ == "__main__":
    main()
