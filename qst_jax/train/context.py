"""What a run's parts share once it is built: `RunContext` (config, backbone, data, where to write and log).

The trainer builds it; a run spec (`single_run.SingleRun`, `sweep_run.SweepRun`)
reads it and never reaches back into the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from qst_jax.data.batches import Batcher
from qst_jax.eval.tasks import evaluate_batches, lm_result
from qst_jax.models import Backbone


@dataclasses.dataclass
class RunContext:
    """One run's shared inputs.

    Attributes:
      config: the validated run config.
      backbone, tokenizer: the frozen model and its tokenizer.
      train_data, eval_data: the batchers (eval_data None without held-out data).
      total_steps: the optimizer steps the run trains to.
      mesh: the device mesh, or None on one device.
      output_dir: the run directory.
      log: where progress lines go.
    """

    config: Any
    backbone: Backbone
    tokenizer: Any
    train_data: Batcher
    eval_data: Batcher | None
    total_steps: int
    mesh: Any
    output_dir: str
    log: Callable[[str], None]

    def held_out(self, eval_step: Any, params: Any) -> dict[str, Any]:
        """Held-out loss and perplexity (LM) or accuracy (classification); arrays `[K]` for a side set."""
        sums = evaluate_batches(eval_step, params, self.backbone.params, self.eval_data.one_pass())
        if self.config.task != "classification":
            result = lm_result(sums)
            result.pop("tokens")
            return result
        result = {"loss": sums["loss_sum"] / max(sums["weight"], 1.0)}
        if self.config.data.num_labels > 1:
            result["accuracy"] = sums["correct"] / max(sums["weight"], 1.0)
        return result

    def export_extra(self, step: int, config: Any = None) -> dict[str, Any]:
        """What an export records beside the method: task, model, sequence length, step, the run config."""
        config = self.config if config is None else config
        return {"task": config.task, "model_path": config.model.path, "seq_len": config.data.seq_len,
                "step": int(step), "config": config.to_dict()}


def result_line(name: str, result: dict[str, float]) -> str:
    """`name: key value, ...`: how an evaluation is logged."""
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
