"""The training run behind `qst-train`: build, evaluate, train, checkpoint, export.

    trainer = Trainer(config)                  # or Trainer(config, tx=my_optax_tx)
    summary = trainer.run(resume=False)

Order of a run: load the backbone and tokenizer, build the data, the model
(QST or QLoRA) and the optimizer; restore the latest checkpoint when resuming;
evaluate held-out data; train with a progress bar, periodic evaluation and
checkpoints; evaluate again; export the trained params. SIGINT/SIGTERM save a
checkpoint and stop; a non-finite loss stops without saving, keeping the last
good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qst_jax.data.batches import Batcher, bucket_lengths
from qst_jax.data.examples import Examples, chat_examples, classification_examples, lm_windows
from qst_jax.data.offline import shakespeare_plays, smollm2_gguf
from qst_jax.data.sources import DataError, load_records
from qst_jax.eval.glue import GLUE_TASKS
from qst_jax.eval.tasks import classify, evaluate_batches, lm_result, mmlu
from qst_jax.models import Backbone, load_backbone, load_tokenizer
from qst_jax.side.config import SideConfig
from qst_jax.side.model import FrozenModel, QLoRAModel, QSTModel
from qst_jax.side.network import count_params
from qst_jax.train.checkpoint import Checkpointer, backbone_fingerprint, export_side
from qst_jax.train.metrics import MetricsWriter, plot_loss_curve
from qst_jax.train.optim import make_optimizer
from qst_jax.train.step import TrainState, init_train_state, make_eval_step, make_train_step

METHODS = ("qst", "qlora")
TASKS = ("lm", "chat", "classification")


class TrainingError(RuntimeError):
    """The run stopped (non-finite loss); the message says where."""


def resolve_model_path(path: str) -> str:
    return smollm2_gguf() if path == "smollm2" else path


def resolve_data(spec: str, holdout: str) -> list[str]:
    """Files of a comma-separated data spec.

    `shakespeare:train` (every packaged play but the held-out ones),
    `shakespeare:heldout` and `shakespeare:<play>` name the packaged plays;
    anything else is a local file, folder or glob.
    """
    files: list[str] = []
    for part in (p for p in spec.split(",") if p):
        files += _shakespeare(part.split(":", 1)[1], holdout) if part.startswith("shakespeare:") else [part]
    return files


def _shakespeare(part: str, holdout: str) -> list[str]:
    plays = shakespeare_plays()
    held = [h for h in holdout.split(",") if h]
    unknown = [h for h in held if h not in plays]
    if unknown:
        raise DataError(f"data.holdout: unknown play(s) {unknown}; known: {sorted(plays)}")
    if part == "train":
        return [p for name, p in plays.items() if name not in held]
    if part == "heldout":
        return [plays[h] for h in held]
    if part in plays:
        return [plays[part]]
    raise DataError(f"shakespeare:{part}: expected shakespeare:train, shakespeare:heldout or shakespeare:<play>")


def build_model(config: Any, backbone: Backbone) -> QSTModel | QLoRAModel:
    if config.method not in METHODS:
        raise ValueError(f"method {config.method!r} is not one of {METHODS}")
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} is not one of {TASKS}")
    task = "classification" if config.task == "classification" else "lm"
    attention = config.model.attention or None
    if config.method == "qlora":
        q = config.qlora
        return QLoRAModel(
            backbone.cfg, rank=q.rank, alpha=q.alpha, task=task, num_labels=config.data.num_labels,
            dtype=backbone.dtype, ce_chunk=config.train.ce_chunk, remat=q.remat, attention_impl=attention,
        )
    s = config.side
    side = SideConfig(
        reduction_factor=s.reduction_factor, adapter_rank=s.adapter_rank, downsampler=s.downsampler,
        side_heads=s.side_heads or None, gate_init=s.gate_init, output_gate_init=s.output_gate_init,
        task=task, num_labels=config.data.num_labels, init_std=s.init_std,
    )
    return QSTModel(
        backbone.cfg, side, dtype=backbone.dtype, ce_chunk=config.train.ce_chunk, remat_side=s.remat,
        attention_impl=attention, hidden_store=s.hidden_store,
    )


def build_examples(config: Any, tokenizer: Any, spec: str, where: str, limit: int = 0) -> Examples:
    ds = load_records(resolve_data(spec, config.data.holdout), format=config.data.format or None)
    d = config.data
    if config.task == "lm":
        examples = lm_windows(ds, tokenizer, d.seq_len, d.text_column, where)
    elif config.task == "chat":
        examples = chat_examples(ds, tokenizer, d.seq_len, where)
    else:
        examples = classification_examples(
            ds, tokenizer, d.seq_len, num_labels=d.num_labels, text_column=d.text_column,
            text_pair_column=d.text_pair_column or None, label_column=d.label_column,
            label_names=[n for n in d.label_names.split(",") if n], where=where,
        )
    if limit and len(examples) > limit:
        keep = slice(0, limit)
        examples = Examples(
            tokens=examples.tokens[keep],
            loss_masks=None if examples.loss_masks is None else examples.loss_masks[keep],
            labels=None if examples.labels is None else examples.labels[keep],
        )
    return examples


@dataclasses.dataclass
class _Stop:
    signal: int | None = None


class Trainer:
    """One training run from a config (see `qst_jax/train/config.py`).

    Args:
      config: a ConfigDict like `base_config()`.
      tx: your own optax GradientTransformation (replaces the configured one).
      schedule: your own `step -> lr` for the configured AdamW.
      backbone: an already loaded Backbone (skips loading `model.path`).
      log: where progress lines go (default: print).
    """

    def __init__(self, config: Any, *, tx: optax.GradientTransformation | None = None, schedule=None,
                 backbone: Backbone | None = None, tokenizer: Any = None, log=print):
        self.config, self.log = config, log
        dtype = jnp.dtype(config.model.dtype)
        for key in ("model.path", "data.train"):
            section, name = key.split(".")
            if not config[section][name]:
                raise ValueError(f"config: {key} is required (--config.{key}=...)")
        path = resolve_model_path(config.model.path)
        p = config.parallel
        if p.side not in ("replicated", "fsdp"):
            raise ValueError(f"config: parallel.side must be 'replicated' or 'fsdp', got {p.side!r}")
        self.mesh = None
        if p.data * p.fsdp * p.tensor > 1:
            from qst_jax.parallel import make_mesh

            if config.train.batch_size % (p.data * p.fsdp):
                raise ValueError(
                    f"train.batch_size {config.train.batch_size} must divide by data x fsdp = {p.data * p.fsdp}"
                )
            self.mesh = make_mesh(p.data, p.fsdp, p.tensor)
        # On a mesh each layer streams to its shards as it is read (no host holds the model).
        self.backbone = backbone or load_backbone(path, quantize=config.model.quantize, dtype=dtype, mesh=self.mesh)
        self.tokenizer = tokenizer or load_tokenizer(path)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        t = config.train
        buckets = [config.data.seq_len] if config.task == "lm" else bucket_lengths(config.data.seq_len)
        self.train_data = Batcher(
            build_examples(config, self.tokenizer, config.data.train, "data.train"),
            t.batch_size, t.micro_batches, buckets=buckets, pad_id=pad, seed=t.seed,
        )
        self.eval_data = None
        if config.data.eval:
            self.eval_data = Batcher(
                build_examples(config, self.tokenizer, config.data.eval, "data.eval", config.data.eval_examples),
                t.eval_batch_size, 1, buckets=buckets, pad_id=pad, shuffle=False, drop_remainder=False,
            )
        self.model = build_model(config, self.backbone)
        self.total_steps = t.epochs * self.train_data.steps_per_epoch if t.epochs > 0 else t.steps
        if tx is None:
            tx, schedule = make_optimizer(config.optim, self.total_steps, schedule)
        self.tx, self.schedule = tx, schedule
        self.state_shardings = None
        if self.mesh is not None:
            self._shard()
        else:
            self.train_step = make_train_step(self.model, self.tx)
        self.eval_step = make_eval_step(self.model)
        model = self.model
        self._task_logits = jax.jit(lambda p, ids, mask: model.logits(p, self.backbone.params, ids, mask))
        self.frozen_eval_step = None
        if config.task != "classification":
            frozen = FrozenModel(self.backbone.cfg, self.backbone.dtype, t.ce_chunk, config.model.attention or None)
            self.frozen_eval_step = make_eval_step(frozen)
        self.output_dir = t.output_dir
        os.makedirs(self.output_dir, exist_ok=True)

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
        from qst_jax.parallel import batch_sharding

        sharding = batch_sharding(self.mesh)
        count, index = jax.process_count(), jax.process_index()

        def local(x: np.ndarray) -> jax.Array:
            rows = x.shape[1] // count
            return jax.make_array_from_process_local_data(sharding, x[:, index * rows : (index + 1) * rows])

        return jax.tree.map(local, batch)

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
        if e.kind not in ("mmlu", "classify"):
            raise ValueError(f"evaluation.kind {e.kind!r} is not one of '', 'mmlu', 'classify'")
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

    def _eval_line(self, name: str, result: dict[str, float]) -> str:
        parts = [f"{k} {v:.4f}" for k, v in result.items()]
        return f"{name}: " + ", ".join(parts)

    # -- the run ---------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        from tqdm import tqdm

        config, t = self.config, self.config.train
        checkpointer = Checkpointer(os.path.join(self.output_dir, "checkpoints"), t.keep_checkpoints)
        state = init_train_state(self.model, self.tx, jax.random.PRNGKey(t.seed))
        if self.state_shardings is not None:
            state = jax.device_put(state, self.state_shardings)
        if resume and checkpointer.latest_step() is not None:
            state, meta = checkpointer.restore(state)
            self.train_data.restore(meta["data"])
            self.log(f"resumed from step {int(state.step)} ({checkpointer.latest_step()})")
        elif resume:
            self.log("no checkpoint found: starting from scratch")
        trainable = count_params(state.params)
        self.log(
            f"{config.method} on {self.backbone.cfg.model_type} ({self.backbone.cfg.num_layers} layers, "
            f"{'NF4' if self.backbone.quantized else 'dense'}): {trainable:,} trainable parameters; "
            f"{len(self.train_data.examples)} train examples"
        )
        writer = MetricsWriter(self.output_dir)
        summary: dict[str, Any] = {"method": config.method, "trainable_params": trainable}
        if self.eval_data is not None and self.frozen_eval_step is not None:
            frozen = self.evaluate({}, self.frozen_eval_step)
            summary["eval_frozen"] = frozen
            self.log(self._eval_line("held-out, frozen backbone alone", frozen))
        if self.eval_data is not None:
            before = self.evaluate(state.params)
            summary["eval_before"] = before
            writer.write(int(state.step), "eval", before)
            self.log(self._eval_line(f"held-out, {config.method} at step {int(state.step)}", before))

        stop = _Stop()
        handlers = {}

        def on_signal(signum, _frame):
            stop.signal = signum

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, on_signal)
            except ValueError:  # not the main thread
                pass

        def save(step: int) -> None:
            meta = {"data": self.train_data.state(), "config": config.to_dict()}
            checkpointer.save(step, state, json.loads(json.dumps(meta, default=str)))

        start_step = int(state.step)
        batches = iter(self.train_data)
        bar = tqdm(total=self.total_steps, initial=start_step, desc=config.method, dynamic_ncols=True,
                   disable=os.environ.get("QST_NO_PROGRESS") == "1")
        tokens_seen, started = 0.0, time.perf_counter()
        last_good = checkpointer.latest_step()
        try:
            while int(state.step) < self.total_steps:
                batch = next(batches)
                state, metrics = self.train_step(state, self.backbone.params, self._place(batch))
                step = int(state.step)
                loss = float(metrics["loss"])
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss {loss} at step {step}; stopped without saving. The last good checkpoint "
                        f"is step {last_good} in {os.path.join(self.output_dir, 'checkpoints')}"
                        if last_good is not None else
                        f"non-finite loss {loss} at step {step}; stopped. No checkpoint was written yet."
                    )
                tokens_seen += float(batch["attention_mask"].sum())
                elapsed = time.perf_counter() - started
                lr = float(self.schedule(step - 1)) if self.schedule is not None else float("nan")
                record = {k: float(v) for k, v in metrics.items()}
                record.update(lr=lr, tokens_per_s=tokens_seen / max(elapsed, 1e-9))
                if step % t.log_every == 0 or step == self.total_steps:
                    writer.write(step, "train", record)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}", lr=f"{lr:.2e}")
                bar.update(1)
                if t.eval_every and step % t.eval_every == 0 and step < self.total_steps:
                    if self.eval_data is not None:
                        result = self.evaluate(state.params)
                        writer.write(step, "eval", result)
                        bar.write(self._eval_line(f"held-out at step {step}", result))
                    task_result = self.task_evaluation(state.params)
                    if task_result:
                        writer.write(step, "task", task_result)
                        bar.write(self._eval_line(f"{config.evaluation.kind} at step {step}", task_result))
                if t.checkpoint_every and step % t.checkpoint_every == 0:
                    save(step)
                    last_good = step
                if stop.signal is not None:
                    if last_good != step:
                        save(step)
                    bar.close()
                    self.log(f"stopped by signal {stop.signal} at step {step}; checkpoint saved, resume with --resume")
                    summary.update(stopped_at=step, signal=stop.signal)
                    return summary
        finally:
            bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            writer.close()

        if checkpointer.latest_step() != int(state.step):
            save(int(state.step))
        checkpointer.close()
        summary["steps"] = int(state.step)
        if self.eval_data is not None:
            after = self.evaluate(state.params)
            summary["eval_after"] = after
            self._append(int(state.step), "eval", after)
            self.log(self._eval_line(f"held-out, {config.method} after training", after))
        task_result = self.task_evaluation(state.params)
        if task_result:
            summary["task_eval"] = task_result
            self._append(int(state.step), "task", task_result)
            self.log(self._eval_line(f"{config.evaluation.kind} after training", task_result))
        params = state.params
        if jax.process_count() > 1:  # every process joins the gather; fsdp-split params become whole
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            self.export(state, params)
            plot_loss_curve(os.path.join(self.output_dir, "metrics.jsonl"), os.path.join(self.output_dir, "loss.png"))
            with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            self.log(f"wrote {self.output_dir}/side.safetensors, qst_config.json, metrics.jsonl, loss.png, tb/")
        return summary

    def _append(self, step: int, split: str, result: dict[str, float]) -> None:
        """One record after the training loop's writer has closed."""
        writer = MetricsWriter(self.output_dir)
        writer.write(step, split, result)
        writer.close()

    def export(self, state: TrainState, params: Any = None) -> None:
        """Writes side.safetensors + qst_config.json of `params` (default: `state.params`)."""
        config = self.config
        info = {
            "method": config.method,
            "task": config.task,
            "model_path": config.model.path,
            "backbone": self.backbone.cfg.to_dict(),
            "backbone_fingerprint": backbone_fingerprint(self.backbone.cfg),
            "side": dict(config.side) if config.method == "qst" else None,
            "qlora": dict(config.qlora) if config.method == "qlora" else None,
            "num_labels": config.data.num_labels,
            "seq_len": config.data.seq_len,
            "step": int(state.step),
        }
        export_side(self.output_dir, state.params if params is None else params, info)
