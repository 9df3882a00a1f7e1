"""The training run behind `qst-train`: build, evaluate, train, checkpoint, export.

    trainer = Trainer(config)                  # or Trainer(config, tx=my_optax_tx, resume=True)
    summary = trainer.run()                    # a sweep (tx=[...], config.sweep): sweep_trainer.py

Order of a run: validate the config and claim the output directory (nothing
is loaded before both pass: `run_dir.py` has the directory's rules); load the
backbone and tokenizer, build the data, the method and the optimizer; restore
the latest checkpoint when resuming; evaluate held-out data; train with a
progress bar, periodic evaluation and checkpoints; evaluate again; export.

The loop does not wait on the device each step: step metrics stay on the
device and are fetched once per `train.log_every` steps (and before every
evaluation, checkpoint and the end), so the host prepares the next batch
while the device works. The logged train loss is the mean over those steps.
A non-finite loss or gradient norm stops the run when its window is fetched,
and a checkpoint is only written after its window was checked, so none holds
non-finite params. SIGINT/SIGTERM save a checkpoint and stop.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qst_jax.errors import QSTError
from qst_jax.data.batches import Batcher, bucket_lengths
from qst_jax.data.examples import pad_id
from qst_jax.data.specs import build_examples, resolve_model_path
from qst_jax.eval.glue import GLUE_TASKS
from qst_jax.eval.tasks import classify, evaluate_batches, lm_result, make_eval_step, mmlu
from qst_jax.files import write_json_atomic
from qst_jax.methods import FrozenModel, build_model, export_side
from qst_jax.models import Backbone, ConfigError, load_backbone, load_config, load_tokenizer
from qst_jax.tree import count_params
from qst_jax.checkpoints import Checkpointer
from qst_jax.train.config import resume_changes, validate
from qst_jax.train.metrics import MetricsWindow, MetricsWriter, NonFiniteError, plot_loss_curve
from qst_jax.train.optim import make_optimizer
from qst_jax.train.run_dir import RunDirectory, top_level
from qst_jax.train.signals import Stop, catch_signals
from qst_jax.train.step import TrainState, init_train_state, make_train_step
from qst_jax.train.sweep import is_sweep


class TrainingError(QSTError, RuntimeError):
    """The run stopped (non-finite loss); the message says where."""


class Trainer:
    """One training run from a config (see `qst_jax/train/config.py`).

    Args:
      config: a ConfigDict like `base_config()`.
      tx: your own optax GradientTransformation (replaces the configured one); a list or a
        name -> tx dict of them trains a sweep (`sweep_trainer.py`), as does `config.sweep`.
      schedule: your own `step -> lr` for the configured AdamW (a list or dict: a sweep).
      backbone: an already loaded Backbone (skips loading `model.path`).
      tokenizer: its tokenizer (with `backbone`).
      resume: continue the run in `train.output_dir` from its newest intact checkpoint.
      overwrite: delete the run in `train.output_dir` first (without it, an existing run is refused).
      log: where progress lines go (default: print).

    Raises:
      ConfigError: a bad config value (every one, each on its line), or a
        resumed run whose checkpoint has other param shapes; before anything is loaded.
      RunDirectoryError: the output directory is in use, holds another run, or has nothing to resume.
    """

    def __init__(self, config: Any, *, tx: optax.GradientTransformation | None = None, schedule=None,
                 backbone: Backbone | None = None, tokenizer: Any = None, resume: bool = False,
                 overwrite: bool = False, log=print):
        validate(config)
        if type(self) is Trainer and is_sweep(config, tx, schedule):
            raise ConfigError("a sweep (config.sweep, or a list or dict of tx or schedule) trains with SweepTrainer: "
                              "build it with qst_jax.train.launch.make_trainer(config, ...) or SweepTrainer(...)")
        self.config, self.log, self.resume = config, log, resume
        path = resolve_model_path(config.model.path)
        validate(config, context=(backbone.cfg if backbone else load_config(path)).max_position_embeddings)
        self.output_dir = config.train.output_dir
        self.run_dir = RunDirectory(self.output_dir)
        if jax.process_index() == 0:  # one process guards the directory all processes share
            replaced = self.run_dir.acquire(resume=resume, overwrite=overwrite)
            if replaced:
                what = "deleted the previous run's files" if overwrite else (
                    "replaced the leftovers of a run that stopped before its first checkpoint")
                self.log(f"{self.output_dir}: {what} ({', '.join(top_level(replaced))})")
        try:
            if resume:
                self._check_resumable()
            self._build(path, tx, schedule, backbone, tokenizer)
        except BaseException:
            self.run_dir.abandon()  # a run that fails before it starts leaves no directory or .lock behind
            raise

    def _check_resumable(self) -> None:
        """Compares the config with the newest readable checkpoint's: shape changes refused, others listed."""
        checkpointer = Checkpointer(os.path.join(self.output_dir, "checkpoints"), self.config.train.keep_checkpoints)
        try:
            stored = checkpointer.newest_meta()
        finally:
            checkpointer.close()
        changed = resume_changes(stored["config"], self.config.to_dict()) if stored else []  # raises on shapes
        if changed:
            self.log("resuming with changed settings: " + ", ".join(changed))

    def _build(self, path: str, tx: Any, schedule: Any, backbone: Backbone | None, tokenizer: Any) -> None:
        config = self.config
        self.mesh = self._make_mesh()
        self.backbone = backbone or self._load_backbone(path)
        self.tokenizer = tokenizer or load_tokenizer(path)
        self.train_data, self.eval_data = self._build_data()
        epochs, steps = config.train.epochs, config.train.steps
        self.total_steps = epochs * self.train_data.steps_per_epoch if epochs > 0 else steps
        self._build_method(tx, schedule)

    def _build_method(self, tx: Any, schedule: Any) -> None:
        """The method, its optimizer and the jitted train and eval steps."""
        config = self.config
        self.model = build_model(config, self.backbone.cfg, dtype=self.backbone.dtype)
        if tx is None:
            tx, schedule = make_optimizer(config.optim, self.total_steps, schedule)
        self.tx, self.schedule = tx, schedule
        self.state_shardings = None
        if self.mesh is not None:
            self._shard()
        else:
            self.train_step = make_train_step(self.model, self.tx)
        self.eval_step = make_eval_step(self.model)
        model, backbone_params = self.model, self.backbone.params
        self._task_logits = jax.jit(lambda p, ids, mask: model.logits(p, backbone_params, ids, mask))
        self.frozen_eval_step = None
        if config.task != "classification":
            frozen = FrozenModel(self.backbone.cfg, self.backbone.dtype, config.train.ce_chunk,
                                 config.model.attention or None)
            self.frozen_eval_step = make_eval_step(frozen)

    # -- building ------------------------------------------------------------------
    def _make_mesh(self) -> Any:
        p = self.config.parallel
        if p.data * p.fsdp * p.tensor == 1:
            return None
        from qst_jax.parallel import make_mesh
        return make_mesh(p.data, p.fsdp, p.tensor)

    def _load_backbone(self, path: str) -> Backbone:
        """On a mesh each layer streams to its shards as it is read (no host holds the model)."""
        placement = None
        if self.mesh is not None:
            from qst_jax.parallel import ShardedPlacement

            placement = ShardedPlacement(self.mesh)
        dtype = jnp.dtype(self.config.model.dtype)
        return load_backbone(path, quantize=self.config.model.quantize, dtype=dtype, placement=placement)

    def _build_data(self) -> tuple[Batcher, Batcher | None]:
        config, t = self.config, self.config.train
        buckets = [config.data.seq_len] if config.task == "lm" else bucket_lengths(config.data.seq_len)
        pad = pad_id(self.tokenizer)
        train = Batcher(
            build_examples(config, self.tokenizer, config.data.train, "data.train", log=self.log),
            t.batch_size, t.micro_batches, buckets=buckets, pad_id=pad, seed=t.seed,
        )
        if not config.data.eval:
            return train, None
        held_out = build_examples(config, self.tokenizer, config.data.eval, "data.eval", config.data.eval_examples,
                                  log=self.log)
        return train, Batcher(held_out, t.eval_batch_size, 1, buckets=buckets, pad_id=pad, shuffle=False,
                              drop_remainder=False)

    def _shard(self) -> None:
        """Builds the sharded step (and places a backbone that was passed in already loaded)."""
        from qst_jax.parallel import backbone_shardings, batch_sharding, fsdp_shardings, replicated

        backbone_sh = backbone_shardings(self.backbone.params, self.mesh)
        self.backbone.params = jax.device_put(self.backbone.params, backbone_sh)  # no-op when loaded on the mesh
        abstract = jax.eval_shape(lambda k: init_train_state(self.model, self.tx, k), jax.random.PRNGKey(0))
        split = fsdp_shardings if self.config.parallel.side == "fsdp" else replicated
        self.state_shardings = split(abstract, self.mesh)
        self.train_step = make_train_step(
            self.model, self.tx, shardings=(self.state_shardings, backbone_sh, batch_sharding(self.mesh))
        )

    def _place(self, batch: dict[str, np.ndarray]) -> Any:
        """On several processes: this process's rows of the global batch, as global arrays."""
        if self.mesh is None or jax.process_count() == 1:
            return batch
        from qst_jax.parallel import place_batch

        return place_batch(batch, self.mesh)

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, params: Any, eval_step=None) -> dict[str, float]:
        """Held-out loss and perplexity (LM) or accuracy (classification)."""
        sums = evaluate_batches(eval_step or self.eval_step, params, self.backbone.params, self.eval_data.one_pass())
        if self.config.task != "classification":
            result = lm_result(sums)
            result.pop("tokens")
            return result
        result = {"loss": sums["loss_sum"] / max(sums["weight"], 1.0)}
        if self.config.data.num_labels > 1:
            result["accuracy"] = sums["correct"] / max(sums["weight"], 1.0)
        return result

    def task_evaluation(self, params: Any) -> dict[str, float] | None:
        """The configured `evaluation.kind` (MMLU or GLUE classification), or None."""
        e = self.config.evaluation
        if not e.kind:
            return None
        fn = self._task_logits
        if e.kind == "mmlu":
            subjects = [s for s in e.subjects.split(",") if s] or None
            result = mmlu(lambda ids, mask: fn(params, ids, mask)[:, -1], self.tokenizer, e.data, shots=e.shots,
                          max_len=e.max_len, subjects=subjects)
            return {"mmlu_average": result["average"], **{f"mmlu_{k}": v for k, v in result["subjects"].items()}}
        task = GLUE_TASKS[e.task]
        result = classify(lambda ids, mask: fn(params, ids, mask), self.tokenizer, task, e.data,
                          seq_len=self.config.data.seq_len)
        return {f"{task.name}_{k}": v for k, v in result.items() if isinstance(v, float)}

    def _evaluate_all(self, writer: MetricsWriter, state: TrainState, when: str, tasks: bool = True
                      ) -> dict[str, Any]:
        """Held-out (and, with `tasks`, task) evaluation of `state.params`: written, logged and returned."""
        step, results = int(state.step), {}
        if self.eval_data is not None:
            results["eval"] = self.evaluate(state.params)
            writer.write(step, "eval", results["eval"])
            self.log(_line(f"held-out, {self.config.method} {when}", results["eval"]))
        task_result = self.task_evaluation(state.params) if tasks else None
        if task_result:
            results["task"] = task_result
            writer.write(step, "task", task_result)
            self.log(_line(f"{self.config.evaluation.kind} {when}", task_result))
        return results

    # -- the run ---------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Trains (or resumes) to `total_steps`; returns the summary (also written as summary.json)."""
        try:
            return self._run()
        finally:
            self.run_dir.release()

    def _run(self) -> dict[str, Any]:
        config, t = self.config, self.config.train
        checkpointer = Checkpointer(os.path.join(self.output_dir, "checkpoints"), t.keep_checkpoints)
        state = self._initial_state(checkpointer)
        trainable = self._trainable_params(state)
        self.log(
            f"{config.method} on {self.backbone.cfg.model_type} ({self.backbone.cfg.num_layers} layers, "
            f"{'NF4' if self.backbone.quantized else 'dense'}): {trainable:,} trainable parameters; "
            f"{len(self.train_data.examples)} train examples"
        )
        summary: dict[str, Any] = {"method": config.method, "trainable_params": trainable}
        writer = MetricsWriter(self.output_dir)
        try:
            if t.eval_at_start:
                self._evaluate_start(writer, state, summary)
            with catch_signals() as stop:
                state = self._train(state, checkpointer, writer, stop)
            if stop.signal is not None:
                summary.update(stopped_at=int(state.step), signal=stop.signal)
                return summary
            if checkpointer.latest_step() != int(state.step):
                self._save(checkpointer, state)
            summary["steps"] = int(state.step)
            if self.timing[1]:
                summary["step_seconds"] = self.timing[0] / self.timing[1]
            after = self._evaluate_all(writer, state, "after training")
            summary.update({k: v for k, v in (("eval_after", after.get("eval")), ("task_eval", after.get("task"))) if v})
        finally:
            writer.close()
            checkpointer.close()
        self._write_outputs(state, summary)
        return summary

    def _trainable_params(self, state: TrainState) -> int:
        return count_params(state.params)

    def _evaluate_start(self, writer: MetricsWriter, state: TrainState, summary: dict[str, Any]) -> None:
        """The frozen backbone's and the starting params' held-out figures, into `summary`."""
        if self.eval_data is not None and self.frozen_eval_step is not None:
            summary["eval_frozen"] = self.evaluate({}, self.frozen_eval_step)
            self.log(_line("held-out, frozen backbone alone", summary["eval_frozen"]))
        before = self._evaluate_all(writer, state, f"at step {int(state.step)}", tasks=False)
        if "eval" in before:
            summary["eval_before"] = before["eval"]

    def _fresh_state(self) -> TrainState:
        return init_train_state(self.model, self.tx, jax.random.PRNGKey(self.config.train.seed))

    def _initial_state(self, checkpointer: Checkpointer) -> TrainState:
        state = self._fresh_state()
        if self.state_shardings is not None:
            state = jax.device_put(state, self.state_shardings)
        if self.resume:
            state, meta, step = checkpointer.restore(state, log=self.log)
            self.train_data.restore(meta["data"])
            if jax.process_index() == 0:
                self.run_dir.cut_metrics(step)
            self.log(f"resumed from step {step}")
        return state

    def _save(self, checkpointer: Checkpointer, state: TrainState) -> None:
        meta = {"data": self.train_data.state(), "config": self.config.to_dict()}
        checkpointer.save(int(state.step), state, json.loads(json.dumps(meta, default=str)))

    def _train(self, state: TrainState, checkpointer: Checkpointer, writer: MetricsWriter, stop: Stop) -> TrainState:
        """The loop: a step per batch, host work overlapping the device, a fetch per log window."""
        from tqdm import tqdm

        t = self.config.train
        step = int(state.step)
        batches = iter(self.train_data)
        bar = tqdm(total=self.total_steps, initial=step, desc=self.config.method, dynamic_ncols=True,
                   disable=os.environ.get("QST_NO_PROGRESS") == "1")
        window, first_step, clock = MetricsWindow(), step + 1, time.perf_counter()
        self.timing = (0.0, 0)  # (seconds, steps) of training after the first step: no compile, eval or saving
        try:
            while step < self.total_steps:
                batch = next(batches)
                state, metrics = self.train_step(state, self.backbone.params, self._place(batch))
                step += 1
                bar.update(1)
                if step == first_step:  # the first step compiles: throughput is timed from its end
                    jax.block_until_ready(metrics)
                    clock = time.perf_counter()
                window.add(step, metrics, 0.0 if step == first_step else float(batch["attention_mask"].sum()))
                checkpoint = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
                evaluate = bool(t.eval_every) and step % t.eval_every == 0 and step < self.total_steps
                last = step == self.total_steps or stop.signal is not None
                if step % t.log_every == 0 or checkpoint or evaluate or last:
                    clock = self._log_window(window, step, first_step, clock, writer, bar, checkpointer)
                if evaluate:
                    self._evaluate_all(writer, state, f"at step {step}")
                if checkpoint or (stop.signal is not None and checkpointer.latest_step() != step):
                    self._save(checkpointer, state)
                if evaluate or checkpoint:
                    clock = time.perf_counter()  # evaluation and saving are not training throughput
                if stop.signal is not None:
                    self.log(f"stopped by signal {stop.signal} at step {step}; checkpoint saved, resume with --resume")
                    break
        finally:
            bar.close()
        return state

    def _log_window(self, window: MetricsWindow, step: int, first_step: int, clock: float, writer: MetricsWriter,
                    bar: Any, checkpointer: Checkpointer) -> float:
        """Fetches and checks the window, writes its record; returns the new clock start."""
        tokens = window.tokens
        try:
            record = window.fetch()
        except NonFiniteError as err:
            last_good = checkpointer.latest_step()
            where = (f"The last good checkpoint is step {last_good} in {os.path.join(self.output_dir, 'checkpoints')}"
                     if last_good is not None else "No checkpoint was written yet.")
            raise TrainingError(f"{err}; stopped without saving. {where}") from None
        now = time.perf_counter()
        if step > first_step:
            record["tokens_per_s"] = tokens / max(now - clock, 1e-9)
            timed_steps = record["steps"] - (1 if step - record["steps"] < first_step else 0)
            self.timing = (self.timing[0] + now - clock, self.timing[1] + timed_steps)
        record["lr"] = float(self.schedule(step - 1)) if self.schedule is not None else float("nan")
        writer.write(step, "train", record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0.0):.0f}",
                        lr=f"{record['lr']:.2e}")
        return now

    def _write_outputs(self, state: TrainState, summary: dict[str, Any]) -> None:
        """Export, loss curve and summary (process 0 writes; every process joins the gather)."""
        params = state.params
        if jax.process_count() > 1:  # fsdp-split params become whole
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
        self.export(state, params)
        plot_loss_curve(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "loss.png"))
        write_json_atomic(os.path.join(self.output_dir, "summary.json"), summary, indent=2)
        self.log(f"wrote {self.output_dir}/{self.export_files}, summary.json, metrics.jsonl, loss.png, tb/")

    export_files = "side.safetensors, qst_config.json"

    def export(self, state: TrainState, params: Any = None) -> None:
        """Writes side.safetensors + qst_config.json of `params` (default: `state.params`)."""
        config = self.config
        extra = {"task": config.task, "model_path": config.model.path, "seq_len": config.data.seq_len,
                 "step": int(state.step), "config": config.to_dict()}
        export_side(self.output_dir, self.model, state.params if params is None else params, self.backbone.cfg, extra)


def _line(name: str, result: dict[str, float]) -> str:
    return f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items())
