"""A sweep's spec: K side networks trained together, one backbone pass per micro-batch.

    Trainer(config)                                # config.sweep.lr = "1e-4,3e-4,1e-3"
    Trainer(config, tx=[tx_a, tx_b])               # your own optax transformations (or a name -> tx dict)
    Trainer(config, schedule={"cos": f, "lin": g}) # your own schedules for the configured AdamW

The trainer (`trainer.py`) drives it as it drives a single run
(`single_run.py`): the run's order, directory rules, checkpoints, signals
and the loop are the same. What differs is here:

  members/<name>/      each member's export (side.safetensors, qst_config.json:
                       loadable by qst-eval and qst-generate like a single run)
  metrics.jsonl, tb/   a record per member, tagged `"member": name`
  loss.png             every member's train (and eval) curve
  summary.json         `members`: each member's held-out figures, ranked best
                       first (lowest held-out loss, highest accuracy for
                       classification), also printed as a table

A member whose loss or gradient norm turns non-finite is frozen at its last
finite params (inside the step), reported by name, and ranked last; the
others train on. The sweep stops, as a single run does, only when every
member has gone non-finite.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np

from qst_jax.eval.glue import GLUE_TASKS
from qst_jax.eval.tasks import classify, make_sides_eval_step, mmlu, split_members
from qst_jax.methods import export_side
from qst_jax.methods.build import method_options
from qst_jax.methods.side_set import SideSet
from qst_jax.tree import count_params
from qst_jax.train.context import RunContext, result_line
from qst_jax.train.loop import Throughput
from qst_jax.train.metrics import MetricsWindow, MetricsWriter
from qst_jax.train.stopping import TrainingError
from qst_jax.models.loops import streaming_options
from qst_jax.train.sweep import Member, SweepState, init_sweep_state, make_sweep_step, with_total_steps


class SweepRun:
    """K QST side networks in one run (see the module docstring).

    Attributes:
      members: the sweep's members (`sweep.Member`), their optimizers sized for the run.
      sides: the SideSet they form; model: the same.
      diverged: member name -> the step whose loss or gradient norm was not finite (-1: before a resume).
    """

    export_files = "members/<name>/ (side.safetensors, qst_config.json)"
    state_shardings = None  # a sweep runs on one device

    def __init__(self, ctx: RunContext, members: list[Member]):
        self.ctx = ctx
        self.members = with_total_steps(members, ctx.total_steps)
        options = method_options(ctx.config)
        self.sides = SideSet(ctx.backbone.cfg, tuple(m.side for m in self.members), dtype=ctx.backbone.dtype,
                             ce_chunk=options["ce_chunk"], remat_side=options["remat_side"],
                             attention_impl=options["attention_impl"], hidden_store=options["hidden_store"])
        self.model, self.tx, self.schedule = self.sides, [m.tx for m in self.members], None
        self.train_step = make_sweep_step(self.sides, self.tx,
                                          compiler_options=streaming_options(ctx.config.model.offload))
        self.eval_step = make_sides_eval_step(self.sides, include_base=self.sides.task == "lm")
        sides, backbone_params = self.sides, ctx.backbone.params
        self._task_logits = jax.jit(lambda p, ids, mask: sides.logits(p, backbone_params, ids, mask, last_only=True))
        self.diverged: dict[str, int] = {}
        self.train_loss: dict[str, float] = {}  # member -> mean train loss of the last logged window

    # -- state -------------------------------------------------------------------------
    def fresh_state(self) -> SweepState:
        return init_sweep_state(self.sides, self.tx, [m.seed for m in self.members], self.ctx.config.train.seed)

    def restored(self, state: SweepState) -> None:
        for member, alive in zip(self.members, np.asarray(state.alive)):
            if not alive:
                self.diverged.setdefault(member.name, -1)  # went non-finite before the resumed checkpoint

    def describe(self, state: SweepState) -> int:
        self.ctx.log(f"sweep of {len(self.members)} members ({len(self.sides.groups)} shapes), one backbone pass "
                     f"per micro-batch: {', '.join(m.name for m in self.members)}")
        return count_params(state.params)

    # -- evaluation ------------------------------------------------------------------
    def evaluate(self, params: Any, eval_step: Any = None) -> dict[str, dict[str, float]]:
        """Held-out figures per member (and of the frozen backbone, "frozen", for LM)."""
        names = (["frozen"] if self.sides.task == "lm" else []) + [m.name for m in self.members]
        return split_members(self.ctx.held_out(eval_step or self.eval_step, params), names)

    def task_evaluation(self, params: Any) -> dict[str, dict[str, float]] | None:
        e = self.ctx.config.evaluation
        if not e.kind:
            return None
        fn = lambda ids, mask: self._task_logits(params, ids, mask)  # noqa: E731
        if e.kind == "mmlu":
            subjects = [s for s in e.subjects.split(",") if s] or None
            results = mmlu(lambda ids, mask: fn(ids, mask)[1:, :, -1], self.ctx.tokenizer, e.data, shots=e.shots,
                           max_len=e.max_len, subjects=subjects, members=True)
            return {m.name: {"mmlu_average": r["average"], **{f"mmlu_{k}": v for k, v in r["subjects"].items()}}
                    for m, r in zip(self.members, results)}
        task = GLUE_TASKS[e.task]
        results = classify(fn, self.ctx.tokenizer, task, e.data, seq_len=self.ctx.config.data.seq_len, members=True)
        return {m.name: {f"{task.name}_{k}": v for k, v in r.items() if isinstance(v, float)}
                for m, r in zip(self.members, results)}

    def evaluate_all(self, writer: MetricsWriter, state: SweepState, when: str, tasks: bool = True
                     ) -> dict[str, Any]:
        ctx, step, results = self.ctx, int(state.step), {}
        if ctx.eval_data is not None:
            results["eval"] = self.evaluate(state.params)
            for name, result in results["eval"].items():
                writer.write(step, "eval", result, member=name)
                ctx.log(result_line("held-out, frozen backbone alone" if name == "frozen" else
                                    f"held-out, {name} {when}", result))
        task_result = self.task_evaluation(state.params) if tasks else None
        if task_result:
            results["task"] = task_result
            for name, result in task_result.items():
                writer.write(step, "task", result, member=name)
                ctx.log(result_line(f"{ctx.config.evaluation.kind}, {name} {when}", result))
        return results

    def evaluate_start(self, writer: MetricsWriter, state: SweepState, summary: dict[str, Any]) -> None:
        before = self.evaluate_all(writer, state, f"at step {int(state.step)}", tasks=False)
        if "frozen" in before.get("eval", {}):
            summary["eval_frozen"] = before["eval"]["frozen"]

    # -- the log window ----------------------------------------------------------------
    def log_window(self, window: MetricsWindow, step: int, clock: Throughput, bar: Any, writer: MetricsWriter,
                   saved_step: int | None) -> None:
        """Per-member records; a member gone non-finite is named and dropped, all of them stop the run."""
        tokens = window.tokens
        steps, host = window.fetch_steps()
        for s, values in zip(steps, host):
            for member, finite in zip(self.members, values["finite"]):
                if not finite and member.name not in self.diverged:
                    self.diverged[member.name] = s
                    self.ctx.log(f"sweep member {member.name}: non-finite loss or gradient norm at step {s}; its "
                                 f"params stay those of step {s - 1} and it trains no further; the others go on")
        if len(self.diverged) == len(self.members):
            raise TrainingError(f"every sweep member went non-finite (steps {self.diverged}); stopped without saving")
        shared: dict[str, float] = {"steps": float(len(steps)), "weight": float(sum(v["weight"] for v in host))}
        rate = clock.lap(step, len(steps), tokens)
        if rate is not None:
            shared["tokens_per_s"] = rate
        losses = []
        for i, member in enumerate(self.members):
            if member.name in self.diverged:
                continue
            record = {key: float(np.mean([v[key][i] for v in host])) for key in ("loss", "grad_norm")}
            if "correct" in host[0]:
                record["correct"] = float(sum(v["correct"][i] for v in host))
            if member.schedule is not None:
                record["lr"] = float(member.schedule(step - 1))
            writer.write(step, "train", {**record, **shared}, member=member.name)
            losses.append(record["loss"])
            self.train_loss[member.name] = record["loss"]
        bar.set_postfix(best_loss=f"{min(losses):.3f}", tok_s=f"{shared.get('tokens_per_s', 0.0):.0f}")

    # -- outputs ---------------------------------------------------------------------
    def write_exports(self, state: SweepState, params: Any, summary: dict[str, Any]) -> None:
        """Each member's export under members/<name>/, and the ranking into `summary` (printed as a table)."""
        after = {"eval": summary.pop("eval_after", None) or {}, "task": summary.pop("task_eval", None) or {}}
        rows = []
        for i, (member, member_params) in enumerate(zip(self.members, self.sides.unstack(params))):
            row = {"member": member.name, **after["eval"].get(member.name, {}), **after["task"].get(member.name, {})}
            if member.name in self.train_loss:
                row["train_loss"] = self.train_loss[member.name]
            if member.name in self.diverged:
                row["diverged_at"] = self.diverged[member.name]
            rows.append(row)
            extra = {**self.ctx.export_extra(state.step, member.config), "sweep_member": member.name,
                     **({"diverged_at": row["diverged_at"]} if "diverged_at" in row else {})}
            export_side(os.path.join(self.ctx.output_dir, "members", member.name), self.sides.member(i), member_params,
                        self.ctx.backbone.cfg, extra)
        summary["members"] = rank(rows, self.sides.task == "classification" and self.sides.num_labels > 1)
        summary["trainable_params_per_member"] = [count_params(p) for p in self.sides.unstack(params)]
        for line in ranking_table(summary["members"]):
            self.ctx.log(line)


def rank(rows: list[dict[str, Any]], by_accuracy: bool) -> list[dict[str, Any]]:
    """Members best first: highest held-out accuracy (classification) or lowest held-out loss (the last
    train loss without held-out data); diverged last."""

    def key(row: dict[str, Any]) -> tuple[int, float]:
        if by_accuracy and "accuracy" in row:
            value = -row["accuracy"]
        else:
            value = row.get("loss", row.get("train_loss", math.nan))
        return (1 if "diverged_at" in row or math.isnan(value) else 0, value if not math.isnan(value) else 0.0)

    return [{"rank": i + 1, **row} for i, row in enumerate(sorted(rows, key=key))]


def ranking_table(rows: list[dict[str, Any]]) -> list[str]:
    """The ranked members as aligned text lines."""
    keys = [k for k in ("loss", "perplexity", "accuracy", "train_loss") if any(k in r for r in rows)]
    width = max([len("member")] + [len(r["member"]) for r in rows])
    lines = [f"{'rank':>4}  {'member':<{width}}  " + "  ".join(f"{k:>10}" for k in keys)]
    for r in rows:
        cells = "  ".join(f"{r[k]:>10.4f}" if k in r else f"{'-':>10}" for k in keys)
        note = f"  diverged at step {r['diverged_at']}" if "diverged_at" in r else ""
        lines.append(f"{r['rank']:>4}  {r['member']:<{width}}  {cells}{note}")
    return lines
