"""From a run's config, or an export's record, to a method: one path for both.

    model = build_model(config, backbone.cfg, dtype=backbone.dtype)   # qst-train
    model = model_from_dict(info["model"], backbone.cfg)             # an export

`build_model` turns the config into the method's own record (`method_record`)
and its runtime options (`method_options`), then calls `model_from_dict`, the
same function that rebuilds an exported run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qst_jax.methods.base import Method
from qst_jax.methods.downsamplers import ON_HOST
from qst_jax.methods.frozen import FrozenModel
from qst_jax.methods.qlora import QLoRAConfig, QLoRAModel
from qst_jax.methods.qst import QSTModel
from qst_jax.methods.side_config import SideConfig
from qst_jax.models.config import ConfigError, ModelConfig

METHODS: dict[str, type] = {"qst": QSTModel, "qlora": QLoRAModel, "frozen": FrozenModel}
TRAINABLE_METHODS = ("qst", "qlora", "frozen")  # frozen: a linear probe (classification only)


def head_task(task: str) -> str:
    """The head a data task trains: "classification", or "lm" for lm and chat."""
    return "classification" if task == "classification" else "lm"


def method_record(config: Any) -> dict[str, Any]:
    """What defines the method's params (the export's `model` record) from a run config.

    `config` has `method`, `task`, `data.num_labels`, `data.pool` and the `side` or
    `qlora` section (a ConfigDict or nested dicts).
    """
    record: dict[str, Any] = {"method": config["method"], "task": head_task(config["task"]),
                              "num_labels": int(config["data"]["num_labels"]), "pool": config["data"]["pool"]}
    if config["method"] == "qst":
        record["side"] = SideConfig.from_dict(dict(config["side"]), task=record["task"],
                                              num_labels=record["num_labels"], pool=record["pool"]).to_dict()
    elif config["method"] == "qlora":
        qlora = QLoRAConfig(rank=int(config["qlora"]["rank"]), alpha=float(config["qlora"]["alpha"]))
        record["qlora"] = {"rank": qlora.rank, "alpha": qlora.alpha}
    return record


def method_options(config: Any) -> dict[str, Any]:
    """How the method runs (not stored with its params): CE chunk, attention, remat, hidden store."""
    options: dict[str, Any] = {"ce_chunk": int(config["train"]["ce_chunk"]),
                               "attention_impl": config["model"]["attention"] or None}
    if config["method"] == "qst":
        store = config["side"]["hidden_store"]
        if config["model"].get("offload") == "weights+states":  # the states the backward keeps go to the host too
            store += ON_HOST
        options.update(remat_side=bool(config["side"]["remat"]), hidden_store=store)
    elif config["method"] == "qlora":
        options["remat"] = bool(config["qlora"]["remat"])
    return options


def model_from_dict(record: Mapping[str, Any], backbone_cfg: ModelConfig, **options: Any) -> Method:
    """The method a `to_dict()` record describes, over the backbone `backbone_cfg`.

    Raises:
      ConfigError: an unknown method name.
    """
    cls = METHODS.get(record.get("method"))
    if cls is None:
        raise ConfigError(f"method {record.get('method')!r} is not one of {tuple(METHODS)}")
    return cls.from_dict(record, backbone_cfg, **options)


def build_model(config: Any, backbone_cfg: ModelConfig, *, dtype: Any) -> Method:
    """The trainable method a run config asks for (`method` qst or qlora)."""
    if config["method"] not in TRAINABLE_METHODS:
        raise ConfigError(f"method {config['method']!r} is not one of {TRAINABLE_METHODS}")
    return model_from_dict(method_record(config), backbone_cfg, dtype=dtype, **method_options(config))
