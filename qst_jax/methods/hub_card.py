"""The model card (README.md with YAML metadata) that goes with a tuned network pushed to the Hub."""

from __future__ import annotations

from typing import Any

from qst_jax.hub import is_repo_id


def model_card(repo: str, info: dict[str, Any], summary: dict[str, Any] | None) -> str:
    """README.md for `repo` from an export's `qst_config.json` record (`info`) and the run's `summary.json`.

    The metadata names the base model (when it is a Hub repo), `library_name:
    qst_jax`, tags, and the training data set (when it is a Hub one); the text
    gives the method, the held-out figures and how to load it.
    """
    model = info.get("model", {})
    base = str(info.get("model_path") or "")
    config = info.get("config") or {}
    train = str((config.get("data") or {}).get("train") or "")
    method = model.get("method", "qst")
    lines = ["---"]
    if is_repo_id(base.split(":", 1)[0]):
        lines.append(f"base_model: {base.split(':', 1)[0]}")
    lines += ["library_name: qst_jax", "tags:", "- qst_jax", f"- {method}", "- nf4"]
    if method == "qst":
        lines.append("- quantized-side-tuning")
    if train.startswith("hf:"):
        lines += ["datasets:", f"- {train[3:].split(':', 1)[0].split('@', 1)[0]}"]
    lines += ["---", "", f"# {repo.split('/', 1)[1]}", ""]
    what = "A QST side network" if method == "qst" else f"A {method} adapter"
    lines.append(f"{what} ({model.get('task', 'lm')}) over the frozen NF4 backbone `{base or 'unknown'}`, "
                 f"trained with qst_jax for {info.get('step', '?')} steps.")
    held = (summary or {}).get("eval_after")
    if held:
        lines += ["", "| held-out | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in held.items()]
    frozen = (summary or {}).get("eval_frozen")
    if frozen:
        lines += ["", "The frozen backbone alone: " + ", ".join(f"{k} {v:.4f}" for k, v in frozen.items()) + "."]
    lines += ["", "Use it with qst_jax:", "", "```bash",
              f"qst-generate --model {base or 'BASE_MODEL'} --side {repo}", "```", ""]
    return "\n".join(lines)
