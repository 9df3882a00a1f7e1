"""A single run's spec: one method, one optimizer, one export (`side.safetensors`, `qst_config.json`).

The trainer (`trainer.py`) drives it: the run's order, directory rules,
checkpoints, signals and the loop are the trainer's; what a single run
trains, evaluates, logs and writes is here. `sweep_run.py` is the other spec.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from qst_jax.eval.glue import GLUE_TASKS
from qst_jax.eval.tasks import classify, make_eval_step, mmlu
from qst_jax.methods import FrozenModel, build_model, export_side
from qst_jax.tree import count_params
from qst_jax.train.context import RunContext, result_line
from qst_jax.train.loop import Throughput
from qst_jax.train.metrics import MetricsWindow, MetricsWriter, NonFiniteError
from qst_jax.train.optim import make_optimizer
from qst_jax.models.loops import streaming_options
from qst_jax.train.step import TrainState, init_train_state, make_train_step
from qst_jax.train.stopping import TrainingError


class SingleRun:
    """One method from the config (or your own optax `tx` / `schedule`), on one device or a mesh.

    Attributes:
      model: the method; tx, schedule: its optimizer and `step -> lr` (None: unknown, for your own tx).
      train_step, eval_step: the jitted steps; state_shardings: the train state's on a mesh (else None).
    """

    export_files = "side.safetensors, qst_config.json"

    def __init__(self, ctx: RunContext, tx: Any = None, schedule: Any = None):
        config, backbone = ctx.config, ctx.backbone
        self.ctx = ctx
        self.model = build_model(config, backbone.cfg, dtype=backbone.dtype)
        if tx is None:
            tx, schedule = make_optimizer(config.optim, ctx.total_steps, schedule)
        self.tx, self.schedule = tx, schedule
        self.state_shardings = None
        if ctx.mesh is not None:
            self._shard()
        else:
            self.train_step = make_train_step(self.model, self.tx,
                                              compiler_options=streaming_options(config.model.offload))
        self.eval_step = make_eval_step(self.model)
        model, backbone_params = self.model, backbone.params
        self._task_logits = jax.jit(lambda p, ids, mask: model.logits(p, backbone_params, ids, mask))
        self.frozen_eval_step = None
        if config.task != "classification":
            frozen = FrozenModel(backbone.cfg, backbone.dtype, config.train.ce_chunk, config.model.attention or None)
            self.frozen_eval_step = make_eval_step(frozen)

    def _shard(self) -> None:
        """The sharded step (and a backbone that was passed in already loaded placed on the mesh)."""
        from qst_jax.parallel import backbone_shardings, batch_sharding, fsdp_shardings, replicated

        ctx = self.ctx
        backbone_sh = backbone_shardings(ctx.backbone.params, ctx.mesh)
        ctx.backbone.params = jax.device_put(ctx.backbone.params, backbone_sh)  # no-op when loaded on the mesh
        abstract = jax.eval_shape(lambda k: init_train_state(self.model, self.tx, k), jax.random.PRNGKey(0))
        split = fsdp_shardings if ctx.config.parallel.side == "fsdp" else replicated
        self.state_shardings = split(abstract, ctx.mesh)
        self.train_step = make_train_step(
            self.model, self.tx, shardings=(self.state_shardings, backbone_sh, batch_sharding(ctx.mesh)))

    # -- state -------------------------------------------------------------------------
    def fresh_state(self) -> TrainState:
        return init_train_state(self.model, self.tx, jax.random.PRNGKey(self.ctx.config.train.seed))

    def restored(self, state: TrainState) -> None:
        """Nothing to note of a resumed state."""

    def describe(self, state: TrainState) -> int:
        """The trainable parameter count."""
        return count_params(state.params)

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, params: Any, eval_step: Any = None) -> dict[str, float]:
        """Held-out loss and perplexity (LM) or accuracy (classification)."""
        return self.ctx.held_out(eval_step or self.eval_step, params)

    def task_evaluation(self, params: Any) -> dict[str, float] | None:
        """The configured `evaluation.kind` (MMLU or GLUE classification), or None."""
        e, fn = self.ctx.config.evaluation, self._task_logits
        if not e.kind:
            return None
        if e.kind == "mmlu":
            subjects = [s for s in e.subjects.split(",") if s] or None
            result = mmlu(lambda ids, mask: fn(params, ids, mask)[:, -1], self.ctx.tokenizer, e.data, shots=e.shots,
                          max_len=e.max_len, subjects=subjects)
            return {"mmlu_average": result["average"], **{f"mmlu_{k}": v for k, v in result["subjects"].items()}}
        task = GLUE_TASKS[e.task]
        result = classify(lambda ids, mask: fn(params, ids, mask), self.ctx.tokenizer, task, e.data,
                          seq_len=self.ctx.config.data.seq_len)
        return {f"{task.name}_{k}": v for k, v in result.items() if isinstance(v, float)}

    def evaluate_all(self, writer: MetricsWriter, state: TrainState, when: str, tasks: bool = True) -> dict[str, Any]:
        """Held-out (and, with `tasks`, task) evaluation of `state.params`: written, logged and returned."""
        ctx, step, results = self.ctx, int(state.step), {}
        if ctx.eval_data is not None:
            results["eval"] = self.evaluate(state.params)
            writer.write(step, "eval", results["eval"])
            ctx.log(result_line(f"held-out, {ctx.config.method} {when}", results["eval"]))
        task_result = self.task_evaluation(state.params) if tasks else None
        if task_result:
            results["task"] = task_result
            writer.write(step, "task", task_result)
            ctx.log(result_line(f"{ctx.config.evaluation.kind} {when}", task_result))
        return results

    def evaluate_start(self, writer: MetricsWriter, state: TrainState, summary: dict[str, Any]) -> None:
        """The frozen backbone's and the starting params' held-out figures, into `summary`."""
        if self.ctx.eval_data is not None and self.frozen_eval_step is not None:
            summary["eval_frozen"] = self.evaluate({}, self.frozen_eval_step)
            self.ctx.log(result_line("held-out, frozen backbone alone", summary["eval_frozen"]))
        before = self.evaluate_all(writer, state, f"at step {int(state.step)}", tasks=False)
        if "eval" in before:
            summary["eval_before"] = before["eval"]

    # -- the log window ------------------------------------------------------------------
    def log_window(self, window: MetricsWindow, step: int, clock: Throughput, bar: Any, writer: MetricsWriter,
                   saved_step: int | None) -> None:
        """Fetches and checks the window (a non-finite loss stops the run), writes its mean record."""
        tokens = window.tokens
        try:
            record = window.fetch()
        except NonFiniteError as err:
            where = (f"The last good checkpoint is step {saved_step} in {os.path.join(self.ctx.output_dir, 'checkpoints')}"
                     if saved_step is not None else "No checkpoint was written yet.")
            raise TrainingError(f"{err}; stopped without saving. {where}") from None
        rate = clock.lap(step, int(record["steps"]), tokens)
        if rate is not None:
            record["tokens_per_s"] = rate
        record["lr"] = float(self.schedule(step - 1)) if self.schedule is not None else float("nan")
        writer.write(step, "train", record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0.0):.0f}",
                        lr=f"{record['lr']:.2e}")

    # -- outputs ---------------------------------------------------------------------------
    def write_exports(self, state: TrainState, params: Any, summary: dict[str, Any]) -> None:
        """side.safetensors + qst_config.json of `params` (the trained params, whole)."""
        export_side(self.ctx.output_dir, self.model, params, self.ctx.backbone.cfg, self.ctx.export_extra(state.step))
