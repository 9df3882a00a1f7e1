"""Two processes on this machine train together through `jax.distributed` (CPU).

    python scripts/two_process_train.py [--model smollm2] [--data shakespeare:macbeth] [--steps 3]

Starts two `qst-train` processes with QST_COORDINATOR on localhost, one CPU
device each, on a 1 x 2 x 1 (fsdp) mesh: each process feeds its own half of
every batch and holds half of the backbone's 4-bit bytes; both write the
orbax checkpoints together and process 0 writes metrics and the export.
Prints each process's last lines and the checkpoints written.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import textwrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="shakespeare:macbeth")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--side", default="replicated", choices=["replicated", "fsdp"],
                        help="side params and optimizer state: on both processes, or split between them")
    parser.add_argument("--out", default="runs/two_process")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    config = os.path.join(out, "config.py")
    with open(config, "w") as f:
        f.write(textwrap.dedent(f"""
            from qst_jax.train.config import base_config

            def get_config():
                c = base_config()
                c.model.path = {args.model!r}
                c.data.train = {args.data!r}
                c.data.eval = {args.data!r}  # evaluated by both processes (before and after training)
                c.data.eval_examples = 4
                c.data.seq_len = {args.seq_len}
                c.side.reduction_factor = 8
                c.parallel.fsdp = 2
                c.parallel.side = {args.side!r}
                c.train.batch_size = 2
                c.train.steps = {args.steps}
                c.train.checkpoint_every = 1
                c.train.log_every = 1
                c.train.output_dir = {os.path.join(out, "run")!r}
                return c
        """))
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, QST_COORDINATOR=f"127.0.0.1:{port}", QST_NUM_PROCESSES="2", QST_PROCESS_ID=str(pid),
                   QST_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        procs.append(subprocess.Popen([sys.executable, "-m", "qst_jax.cli.train", f"--config={config}"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes = []
    for pid, proc in enumerate(procs):
        output, _ = proc.communicate(timeout=1800)
        codes.append(proc.returncode)
        lines = [line for line in output.splitlines() if not line.startswith(("I1", "W1", "[Gloo]"))]
        print(f"--- process {pid} (exit {proc.returncode})")
        print("\n".join(lines[-6:]))
    checkpoints = sorted(os.listdir(os.path.join(out, "run", "checkpoints"))) if codes == [0, 0] else []
    print(f"checkpoints: {checkpoints}")
    return 0 if codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())
