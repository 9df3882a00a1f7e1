"""The training run behind `qst-train`: build, evaluate, train, checkpoint, export.

    trainer = Trainer(config)                  # or Trainer(config, tx=my_optax_tx, resume=True)
    summary = trainer.run()

One trainer runs both kinds of run; what differs is its spec:
`single_run.SingleRun` (one method, one export) or `sweep_run.SweepRun` (K side
networks over one backbone pass: `config.sweep`, or a list or dict of `tx` or
`schedule`). The trainer owns the order of a run and the loop (`loop.py`),
and hands the spec the loop's hooks: the log window, evaluation, export.

Order of a run: validate the config once and claim the output directory
(nothing is loaded before both pass: `run_dir.py` has the directory's rules);
load the backbone and tokenizer, build the data and the spec; restore the
latest checkpoint when resuming; evaluate held-out data; train with a
progress bar, periodic evaluation and checkpoints; evaluate again; export.
A checkpoint is only written after its log window was checked, so none holds
non-finite params. SIGINT/SIGTERM save a checkpoint and stop.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qst_jax.checkpoints import Checkpointer
from qst_jax.data.batches import Batcher, bucket_lengths
from qst_jax.data.examples import pad_id
from qst_jax.data.specs import build_examples, resolve_model_path, stream_batcher
from qst_jax.files import write_json_atomic
from qst_jax.models import Backbone, load_backbone, load_config, load_tokenizer
from qst_jax.models.hub import resolve_model
from qst_jax.models.loader import offload_layers
from qst_jax.train.config import check_context, resume_changes, validate
from qst_jax.train.context import RunContext
from qst_jax.train.loop import LoopHooks, Periods, train_loop
from qst_jax.train.metrics import MetricsWriter, plot_loss_curve, tb_tag
from qst_jax.run_dir import RunDirectory, top_level
from qst_jax.train.signals import catch_signals
from qst_jax.train.single_run import SingleRun
from qst_jax.train.stopping import TrainingError
from qst_jax.train.sweep import is_sweep, plan_members
from qst_jax.train.sweep_run import SweepRun

__all__ = ["Trainer", "TrainingError"]


class Trainer:
    """One training run from a config (see `qst_jax/train/config.py`): a single run or a sweep.

    Args:
      config: a ConfigDict like `base_config()`.
      tx: your own optax GradientTransformation (replaces the configured one); a list or a
        name -> tx dict of them trains a sweep, as does `config.sweep`.
      schedule: your own `step -> lr` for the configured AdamW (a list or dict: a sweep).
      backbone: an already loaded Backbone (skips loading `model.path`).
      tokenizer: its tokenizer (with `backbone`).
      resume: continue the run in `train.output_dir` from its newest intact checkpoint.
      overwrite: delete the run in `train.output_dir` first (without it, an existing run is refused).
      log: where progress lines go (default: print).
      init: `(ctx, spec, state) -> state`: the state a fresh run starts from (default: the spec's
        own init), e.g. side blocks started from pruned backbone weights.

    Attributes:
      spec: the run's `SingleRun` or `SweepRun`; train_step: the jitted step the loop calls.

    Raises:
      ConfigError: a bad config value (every one, each on its line), or a
        resumed run whose checkpoint has other param shapes; before anything is loaded.
      RunDirectoryError: the output directory is in use, holds another run, or has nothing to resume.
    """

    def __init__(self, config: Any, *, tx: optax.GradientTransformation | Any = None, schedule: Any = None,
                 backbone: Backbone | None = None, tokenizer: Any = None, resume: bool = False,
                 overwrite: bool = False, log: Callable[[str], None] = print,
                 init: Callable[[RunContext, Any, Any], Any] | None = None):
        validate(config)
        members = plan_members(config, tx, schedule) if is_sweep(config, tx, schedule) else None
        path = resolve_model(resolve_model_path(config.model.path), config.model.revision or None)
        check_context(config, (backbone.cfg if backbone else load_config(path)).max_position_embeddings)
        self.config, self.log, self.resume, self.init = config, log, resume, init
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
            self.ctx = self._build_context(path, backbone, tokenizer)
            self.spec = SweepRun(self.ctx, members) if members is not None else SingleRun(self.ctx, tx, schedule)
            self.train_step = self.spec.train_step
        except BaseException:
            self.run_dir.abandon()  # a run that fails before it starts leaves no directory or .lock behind
            raise

    # -- what a caller reads ---------------------------------------------------------------
    @property
    def backbone(self) -> Backbone:
        return self.ctx.backbone

    @property
    def tokenizer(self) -> Any:
        return self.ctx.tokenizer

    @property
    def tx(self) -> Any:
        """The optimizer (a list of them, one per member, for a sweep)."""
        return self.spec.tx

    def evaluate(self, params: Any) -> dict[str, Any]:
        """Held-out figures of `params` (per member for a sweep)."""
        return self.spec.evaluate(params)

    # -- building ------------------------------------------------------------------------
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

    def _build_context(self, path: str, backbone: Backbone | None, tokenizer: Any) -> RunContext:
        config, t = self.config, self.config.train
        p = config.parallel
        mesh = None
        if p.data * p.fsdp * p.tensor > 1:
            from qst_jax.parallel import make_mesh

            mesh = make_mesh(p.data, p.fsdp, p.tensor)
        if backbone is None:
            backbone = self._load_backbone(path, mesh)
        elif config.model.offload != "none":  # a backbone passed in loaded: its layers move to host memory
            backbone.params = offload_layers(backbone.params)
        tokenizer = tokenizer or load_tokenizer(path)
        buckets = [config.data.seq_len] if config.task == "lm" else bucket_lengths(config.data.seq_len)
        pad = pad_id(tokenizer)
        if config.data.streaming:
            train = stream_batcher(config, tokenizer)
        else:
            train = Batcher(build_examples(config, tokenizer, config.data.train, "data.train", log=self.log),
                            t.batch_size, t.micro_batches, buckets=buckets, pad_id=pad, seed=t.seed)
        held_out = None
        if config.data.eval:
            examples = build_examples(config, tokenizer, config.data.eval, "data.eval", config.data.eval_examples,
                                      log=self.log)
            held_out = Batcher(examples, t.eval_batch_size, 1, buckets=buckets, pad_id=pad, shuffle=False,
                               drop_remainder=False)
        total = t.epochs * train.steps_per_epoch if t.epochs > 0 else t.steps
        return RunContext(config, backbone, tokenizer, train, held_out, total, mesh, self.output_dir, self.log)

    def _load_backbone(self, path: str, mesh: Any) -> Backbone:
        """On a mesh each layer streams to its shards as it is read (no host holds the model)."""
        placement = None
        if mesh is not None:
            from qst_jax.parallel import ShardedPlacement

            placement = ShardedPlacement(mesh)
        dtype = jnp.dtype(self.config.model.dtype)
        return load_backbone(path, quantize=self.config.model.quantize, dtype=dtype, placement=placement,
                             offload=self.config.model.offload)

    def _place(self, batch: dict[str, np.ndarray]) -> Any:
        """On several processes: this process's rows of the global batch, as global arrays."""
        if self.ctx.mesh is None or jax.process_count() == 1:
            return batch
        from qst_jax.parallel import place_batch

        return place_batch(batch, self.ctx.mesh)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Trains (or resumes) to `total_steps`; returns the summary (also written as summary.json)."""
        try:
            return self._run()
        except BaseException:
            if jax.process_index() == 0 and not self.run_dir.has_checkpoint():
                self.run_dir.abandon()  # failed before its first checkpoint: no .lock or empty folders left behind
            raise
        finally:
            self.run_dir.release()

    def _run(self) -> dict[str, Any]:
        config, t, ctx, spec = self.config, self.config.train, self.ctx, self.spec
        checkpointer = Checkpointer(os.path.join(self.output_dir, "checkpoints"), t.keep_checkpoints)
        state = self._initial_state(checkpointer)
        trainable = spec.describe(state)
        self.log(
            f"{config.method} on {ctx.backbone.cfg.model_type} ({ctx.backbone.cfg.num_layers} layers, "
            f"{'NF4' if ctx.backbone.quantized else 'dense'}): {trainable:,} trainable parameters; "
            f"{ctx.train_data.describe()}"
        )
        summary: dict[str, Any] = {"method": config.method, "trainable_params": trainable}
        writer = MetricsWriter(self.output_dir)
        try:
            if t.eval_at_start and int(state.step) == 0:  # a resumed run has its start's records already
                spec.evaluate_start(writer, state, summary)
            hooks = LoopHooks(
                window=lambda window, step, clock, bar: spec.log_window(window, step, clock, bar, writer,
                                                                        checkpointer.latest_step()),
                evaluate=lambda state, step: spec.evaluate_all(writer, state, f"at step {step}"),
                checkpoint=lambda state, step: self._save(checkpointer, state),
                saved_step=checkpointer.latest_step,
                stopped=lambda signal, step: self.log(f"stopped by signal {signal} at step {step}; checkpoint saved, "
                                                      "resume with --resume"),
            )
            with catch_signals() as stop:
                state, clock = train_loop(state, self.train_step, ctx.backbone.params, iter(ctx.train_data),
                                          ctx.total_steps, Periods(t.log_every, t.eval_every, t.checkpoint_every),
                                          hooks, stop, place=self._place, desc=config.method)
            if stop.signal is not None:
                summary.update(stopped_at=int(state.step), signal=stop.signal)
                return summary
            if checkpointer.latest_step() != int(state.step):
                self._save(checkpointer, state)
            summary["steps"] = int(state.step)
            if clock.steps:
                summary["step_seconds"] = clock.seconds / clock.steps
            after = spec.evaluate_all(writer, state, "after training")
            summary.update({k: v for k, v in (("eval_after", after.get("eval")), ("task_eval", after.get("task"))) if v})
        finally:
            writer.close()
            checkpointer.close()
        self._write_outputs(state, summary)
        return summary

    def _initial_state(self, checkpointer: Checkpointer) -> Any:
        state = self.spec.fresh_state()
        if self.init is not None:
            state = self.init(self.ctx, self.spec, state)
        if self.spec.state_shardings is not None:
            state = jax.device_put(state, self.spec.state_shardings)
        if self.resume:
            state, meta, step = checkpointer.restore(state, log=self.log)
            self.ctx.train_data.restore(meta["data"])
            if jax.process_index() == 0:
                self.run_dir.cut_metrics(step, tb_tag, final=step >= self.ctx.total_steps)
            self.log(f"resumed from step {step}")
            self.spec.restored(state)
        return state

    def _save(self, checkpointer: Checkpointer, state: Any) -> None:
        meta = {"data": self.ctx.train_data.state(), "config": self.config.to_dict()}
        checkpointer.save(int(state.step), state, json.loads(json.dumps(meta, default=str)))

    def _write_outputs(self, state: Any, summary: dict[str, Any]) -> None:
        """Exports, loss curve and summary (process 0 writes; every process joins the gather)."""
        params = state.params
        if jax.process_count() > 1:  # fsdp-split params become whole
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
        self.spec.write_exports(state, params, summary)
        plot_loss_curve(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "loss.png"))
        write_json_atomic(os.path.join(self.output_dir, "summary.json"), summary, indent=2)
        self.log(f"wrote {self.output_dir}/{self.spec.export_files}, summary.json, metrics.jsonl, loss.png, tb/")
