"""Every config key qst-train knows, with its default, and `validate`. Recipes in configs/ start from this.

Override any key from the command line: `--config.train.lr=3e-4`. A key that
is not here is an error. `validate(config)` checks every value before anything
is loaded and reports each bad one on its own line, naming the key.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from qst_jax.errors import InputError, MissingFileError
from qst_jax.eval.glue import GLUE_TASKS
from qst_jax.methods.build import TRAINABLE_METHODS
from qst_jax.methods.qlora import QLoRAConfig
from qst_jax.methods.settings import field_problems, settings
from qst_jax.methods.side_config import SideConfig, SideOptions
from qst_jax.models.config import ConfigError
from qst_jax.models.loader import OFFLOAD_MODES
from qst_jax.models.random_init import LLAMA2_SHAPES
from qst_jax.train.optim import SCHEDULES

DATA_TASKS = ("lm", "chat", "classification")
EVALUATION_KINDS = ("", "mmlu", "classify")
ATTENTION_IMPLS = ("", "xla", "cudnn")
SIDE_PLACEMENTS = ("replicated", "fsdp")
DTYPES = ("bfloat16", "float16", "float32")
SWEEP_MODES = ("zip", "grid")
# The config dataclasses whose fields are run-config keys (each field's `setting` names its key).
SETTINGS = (SideConfig, SideOptions, QLoRAConfig)
# sweep.<key> -> the config key each member's value replaces ("seed": the member's init seed)
SWEEP_KEYS = {
    "lr": "optim.lr", "schedule": "optim.schedule", "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio", "final_lr_fraction": "optim.final_lr_fraction",
    "weight_decay": "optim.weight_decay", "b1": "optim.b1", "b2": "optim.b2", "eps": "optim.eps",
    "clip_norm": "optim.clip_norm", "readout_lr": "optim.readout_lr", "gate_lr": "optim.gate_lr",
    "seed": "train.seed",
    **{f.name: f.metadata["key"] for f in settings(SideConfig) if f.metadata["sweep"]},
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.method = "qst"  # "qst" (side network), "qlora" (baseline: LoRA through the backbone), "frozen" (linear probe)
    c.task = "lm"  # "lm" (raw text), "chat" (instruction records), "classification"

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2"  # local HF dir, bnb NF4 dir, .gguf file, "smollm2" (the packaged GGUF), or a Hub repo
    # "org/name" ("org/name:file.gguf" for one file of a GGUF repo): downloaded into the Hub cache (models/hub.py)
    c.model.revision = ""  # the Hub repo's branch, tag or commit ("": its default branch)
    c.model.quantize = True  # hold the backbone's linears as NF4
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.attention = ""  # jax.nn.dot_product_attention implementation: "", "xla", "cudnn"
    # "weights": the frozen layers stay in pinned host memory and stream to the device one layer at a time
    # (QST reads each once per micro-batch, forward only); "none": all on the device
    c.model.offload = "none"
    c.model.shape = ""  # "llama2-7b" / "llama2-13b" / "llama2-70b": the shape --plan compiles when model.path has none

    c.side = ml_collections.ConfigDict()  # every key, its default and its meaning: methods/side_config.py
    c.qlora = ml_collections.ConfigDict()  # methods/qlora.py (QLoRAConfig)

    c.data = ml_collections.ConfigDict()
    c.data.train = "shakespeare:train"  # files/folders/globs (comma-separated), shakespeare:train, or a Hub data set
    # hf:org/name[:config][@split] (e.g. hf:nyu-mll/glue:sst2; split default train, validation for data.eval)
    c.data.eval = "shakespeare:heldout"  # held-out data, same format; "" for none
    c.data.format = ""  # json | csv | tsv | parquet | text; default from the extension
    c.data.holdout = "hamlet"  # shakespeare plays held out (comma-separated)
    c.data.seq_len = 128  # LM window / maximum example length
    c.data.text_column = "text"
    c.data.text_pair_column = ""
    # chat: the columns of a conversation ("" : the layouts data/examples.py knows: messages, instruction/input/
    # output, prompt/response); messages_column holds [{role, content}, ...]; prompt/response_column one turn each
    c.data.messages_column = ""
    c.data.prompt_column = ""
    c.data.response_column = ""
    c.data.label_column = "label"
    # data.num_labels and data.pool: methods/side_config.py
    c.data.label_names = ""  # comma-separated class names when labels are names (MNLI: contradiction,entailment,neutral)
    c.data.streaming = False  # read data.train one record at a time, never all in memory (task lm; train.steps)
    c.data.eval_examples = 64  # cap on held-out examples/windows (0: all)

    # Device mesh (qst_jax.parallel): data x fsdp x tensor must equal the device
    # count; 1 x 1 x 1 is one device, no mesh. batch_size must divide by data x fsdp.
    c.parallel = ml_collections.ConfigDict()
    c.parallel.data = 1
    c.parallel.fsdp = 1
    c.parallel.tensor = 1
    # Side params and optimizer state: "replicated" on every device, or "fsdp":
    # split over the fsdp axis (for side networks too big to copy everywhere).
    c.parallel.side = "replicated"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200
    c.train.epochs = 0  # > 0: train this many passes over the data instead of `steps`
    c.train.batch_size = 4  # per micro-batch
    c.train.micro_batches = 1  # gradient accumulation
    c.train.seed = 0
    c.train.eval_every = 100  # 0: only before and after
    c.train.eval_at_start = True  # held-out evaluation before the first step (and of the frozen backbone)
    c.train.eval_batch_size = 8
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 2
    c.train.output_dir = "runs/default"
    c.train.ce_chunk = 1024  # tokens per cross-entropy chunk
    c.train.log_every = 10

    # Task evaluation inside qst-train, with every held-out evaluation and at the end
    # (as the official code's MMLU hook): "" (off), "mmlu" or "classify".
    c.evaluation = ml_collections.ConfigDict()
    c.evaluation.kind = ""
    c.evaluation.data = ""  # the MMLU folder (dev/, test/) or a GLUE file
    c.evaluation.task = ""  # classify: a GLUE task name (sst2, mnli, ...)
    c.evaluation.shots = 5
    c.evaluation.subjects = ""  # mmlu: comma-separated subset
    c.evaluation.max_len = 1024

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-3
    c.optim.schedule = "cosine"  # constant | linear | cosine (all with linear warmup)
    c.optim.warmup_steps = 0
    c.optim.warmup_ratio = 0.03
    c.optim.final_lr_fraction = 0.1
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.clip_norm = 1.0
    c.optim.readout_lr = 0.0  # > 0: peak lr of the score head and QST's up-projection (0: optim.lr)
    c.optim.gate_lr = 0.0  # > 0: peak lr of QST's gates (0: optim.lr)

    # A sweep: several QST side networks trained together on the same batches,
    # the backbone run once per micro-batch (qst_jax/train/sweep.py). Each key
    # takes comma-separated values ("" = not swept): --config.sweep.lr=1e-4,3e-4.
    # "zip": the i-th values go together (lists of one value apply to all);
    # "grid": every combination. seed: the members' init seeds (the batches
    # follow train.seed for all of them).
    c.sweep = ml_collections.ConfigDict()
    c.sweep.mode = "zip"
    for key in SWEEP_KEYS:
        setattr(c.sweep, key, "")

    for cls in SETTINGS:  # the sections' keys written once, in the config dataclasses
        for f in settings(cls):
            if f.metadata["key"] is not None:
                section, name = f.metadata["key"].split(".")
                setattr(c[section], name, f.default)

    c.lock()
    return c


def load_preset(anchor: str, name: str) -> ml_collections.ConfigDict:
    """The config of recipe `name`.py in the folder of file `anchor` (recipes building on recipes)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f"{name}.py")
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such recipe")
    spec = importlib.util.spec_from_file_location(f"qst_preset_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def on_mesh(c: ml_collections.ConfigDict, *, data: int = 1, fsdp: int = 1, tensor: int = 1,
            sequences_per_step: int, output_dir: str) -> ml_collections.ConfigDict:
    """`c` laid out on a data x fsdp x tensor mesh, one sequence per batch shard.

    Each micro-batch holds `data * fsdp` sequences (one per shard of the batch
    axis); gradient accumulation makes up `sequences_per_step` per optimizer
    step, so the recipe's effective batch is unchanged.
    """
    per_micro = data * fsdp
    if sequences_per_step % per_micro:
        raise InputError(f"{sequences_per_step} sequences a step do not split over data x fsdp = {per_micro}")
    c.parallel.data, c.parallel.fsdp, c.parallel.tensor = data, fsdp, tensor
    c.train.batch_size = per_micro
    c.train.micro_batches = sequences_per_step // per_micro
    c.train.output_dir = output_dir
    return c


def _enum(errors: list[str], key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        errors.append(f"{key}: {value!r} is not one of {allowed}")


def _at_least(errors: list[str], key: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        errors.append(f"{key}: {value!r} must be an integer >= {low}")


def check_context(c: Any, context: int) -> None:
    """`data.seq_len` against the model's `max_position_embeddings` (known once its config is read).

    Raises:
      ConfigError: naming `data.seq_len`.
    """
    if c.data.seq_len > context:
        raise ConfigError(f"bad config:\n  data.seq_len: {c.data.seq_len} exceeds the model's context of {context} "
                          "positions", field="data.seq_len")


def validate(c: Any, *, planning: bool = False) -> None:
    """Checks every value of a run config; nothing is loaded (`check_context` checks it against the model).

    Args:
      c: a config like `base_config()`.
      planning: for `--plan`, which reads no data and may take its model
        from `model.shape`: `model.path` and `data.train` may be empty.

    Raises:
      ConfigError: one line per bad value, each naming its key.
    """
    errors: list[str] = []
    _enum(errors, "method", c.method, TRAINABLE_METHODS)
    _enum(errors, "task", c.task, DATA_TASKS)
    if c.method == "frozen" and c.task != "classification":
        errors.append("method: 'frozen' trains only a score head, so it needs task='classification' (a linear probe)")
    for key in () if planning else ("model.path", "data.train"):
        section, name = key.split(".")
        if not c[section][name]:
            errors.append(f"{key}: is required (--config.{key}=...)")
    _enum(errors, "model.dtype", c.model.dtype, DTYPES)
    _enum(errors, "model.attention", c.model.attention, ATTENTION_IMPLS)
    _enum(errors, "model.offload", c.model.offload, OFFLOAD_MODES)
    if c.model.offload != "none" and c.parallel.data * c.parallel.fsdp * c.parallel.tensor > 1:
        errors.append("model.offload: streams the layers from one device's host memory; parallel.* must be 1")
    _enum(errors, "model.shape", c.model.shape, ("", *(f"llama2-{k}" for k in LLAMA2_SHAPES)))
    errors += field_problems(c, classes=SETTINGS)
    for key in ("train.batch_size",
                "train.micro_batches", "train.eval_batch_size", "train.keep_checkpoints", "train.ce_chunk",
                "train.log_every", "parallel.data", "parallel.fsdp", "parallel.tensor"):
        section, name = key.split(".")
        _at_least(errors, key, c[section][name], 1)
    for key in ("train.epochs", "train.eval_every", "train.checkpoint_every",
                "data.eval_examples", "optim.warmup_steps"):
        section, name = key.split(".")
        _at_least(errors, key, c[section][name], 0)
    if c.train.epochs == 0:
        _at_least(errors, "train.steps", c.train.steps, 1)
    _at_least(errors, "data.seq_len", c.data.seq_len, 2)
    lr = c.optim.lr
    if not isinstance(lr, int | float) or not math.isfinite(lr) or lr <= 0:
        errors.append(f"optim.lr: {lr!r} must be a finite number > 0")
    _enum(errors, "optim.schedule", c.optim.schedule, SCHEDULES)
    if not 0 <= c.optim.warmup_ratio < 1:
        errors.append(f"optim.warmup_ratio: {c.optim.warmup_ratio!r} must be in [0, 1)")
    for key in ("optim.weight_decay", "optim.clip_norm", "optim.final_lr_fraction", "optim.readout_lr",
                "optim.gate_lr"):
        value = c.optim[key.split(".")[1]]
        if not math.isfinite(value) or value < 0:
            errors.append(f"{key}: {value!r} must be a finite number >= 0")
    _enum(errors, "parallel.side", c.parallel.side, SIDE_PLACEMENTS)
    _enum(errors, "evaluation.kind", c.evaluation.kind, EVALUATION_KINDS)
    if c.evaluation.kind == "classify":
        _enum(errors, "evaluation.task", c.evaluation.task, tuple(GLUE_TASKS))
    if c.evaluation.kind and not c.evaluation.data:
        errors.append(f"evaluation.data: is required with evaluation.kind={c.evaluation.kind!r}")
    if not errors and c.parallel.data * c.parallel.fsdp > 1 and c.train.batch_size % (c.parallel.data * c.parallel.fsdp):
        errors.append(f"train.batch_size: {c.train.batch_size} must divide by parallel.data x parallel.fsdp = "
                      f"{c.parallel.data * c.parallel.fsdp}")
    if c.data.streaming and c.task != "lm":
        errors.append(f"data.streaming: streams LM text (packed windows); task is {c.task!r}")
    if c.data.streaming and c.train.epochs:
        errors.append("data.streaming: a stream's length is unknown before it is read; set train.steps, not "
                      "train.epochs")
    _enum(errors, "sweep.mode", c.sweep.mode, SWEEP_MODES)
    swept = [k for k in SWEEP_KEYS if str(c.sweep[k]).strip()]
    if swept and c.method != "qst":
        errors.append(f"sweep.{swept[0]}: a sweep trains QST side networks (one backbone pass feeds them all); "
                      f"method is {c.method!r}")
    if swept and c.parallel.data * c.parallel.fsdp * c.parallel.tensor > 1:
        errors.append(f"sweep.{swept[0]}: a sweep runs on one device (parallel.* must be 1)")
    if errors:
        raise ConfigError("bad config:\n" + "\n".join(f"  {e}" for e in errors), field=errors[0].split(":", 1)[0])


# Keys whose change gives the trained params (or the optimizer state) other shapes: a resumed run refuses them.
SHAPE_KEYS = ("method", "task", "model.path", "model.quantize",
              *(f.metadata["key"] for cls in SETTINGS for f in settings(cls) if f.metadata["shape"] and f.metadata["key"]))
SHAPE_KEYS += tuple(f"sweep.{k}" for k in ("mode", *SWEEP_KEYS))  # which members a sweep has
NOT_COMPARED_ON_RESUME = ("train.output_dir",)
# Keys that add a part to the optimizer (its state) when > 0: clipping, a parameter group's own learning rate.
OPTIMIZER_PARTS = ("optim.clip_norm", "optim.readout_lr", "optim.gate_lr")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`"key old -> new"` for each setting a resumed run changes.

    Raises:
      ConfigError: a change of a key in SHAPE_KEYS (or switching a key of
        OPTIMIZER_PARTS on or off, which changes the optimizer state), naming each.
    """
    defaults = _flat(base_config().to_dict())  # keys a stored config predates count as their defaults
    old, new = {**defaults, **_flat(stored)}, {**defaults, **_flat(current)}
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in NOT_COMPARED_ON_RESUME]
    described = {k: f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys}
    refused = [k for k in keys if k in SHAPE_KEYS]
    for key in OPTIMIZER_PARTS:  # on or off changes the optimizer state's structure
        if key in keys and (float(old.get(key) or 0) > 0) != (float(new.get(key) or 0) > 0):
            refused.append(key)
    members = [k for k in refused if k.startswith("sweep.")]
    if members:
        raise ConfigError(
            f"--resume: {', '.join(described[k] for k in members)}: a sweep's members are its list's values (each "
            "named by them: members/<name>/, metrics tagged by name), so another list is other members, whose "
            "params and optimizer state the checkpoint does not hold; keep the checkpoint's list, or start over "
            "with --overwrite"
        )
    if refused:
        raise ConfigError(
            f"--resume: {', '.join(described[k] for k in refused)}: the checkpoint's params or optimizer state "
            "have other shapes; keep the checkpoint's values, or start over with --overwrite"
        )
    return [described[k] for k in keys]
