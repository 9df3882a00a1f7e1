"""Every config key qst-train knows, with its default. Recipes in configs/ start from this.

Override any key from the command line: `--config.train.lr=3e-4`. A key that
is not here is an error.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.method = "qst"  # "qst" (side network) or "qlora" (baseline: LoRA through the backbone)
    c.task = "lm"  # "lm" (raw text), "chat" (instruction records), "classification"

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2"  # local HF dir, bnb NF4 dir, .gguf file, or "smollm2" (the packaged GGUF)
    c.model.quantize = True  # hold the backbone's linears as NF4
    c.model.dtype = "bfloat16"  # compute dtype
    c.model.attention = ""  # jax.nn.dot_product_attention implementation: "", "xla", "cudnn"

    c.side = ml_collections.ConfigDict()
    c.side.reduction_factor = 16
    c.side.adapter_rank = 16
    c.side.downsampler = "adapter"  # adapter | lora | linear | maxpool | avgpool
    c.side.side_heads = 0  # 0: the backbone's head count (official layout)
    c.side.gate_init = 0.5
    c.side.output_gate_init = 1.0
    c.side.init_std = 0.02
    c.side.remat = False  # recompute side blocks in the backward pass
    c.side.hidden_store = "compute"  # how the backward keeps backbone states: "compute" (bf16) or "fp8"

    c.qlora = ml_collections.ConfigDict()
    c.qlora.rank = 16
    c.qlora.alpha = 16.0
    c.qlora.remat = True

    c.data = ml_collections.ConfigDict()
    c.data.train = "shakespeare:train"  # files/folders/globs (comma-separated) or shakespeare:train
    c.data.eval = "shakespeare:heldout"  # held-out data, same format; "" for none
    c.data.format = ""  # json | csv | tsv | parquet | text; default from the extension
    c.data.holdout = "hamlet"  # shakespeare plays held out (comma-separated)
    c.data.seq_len = 128  # LM window / maximum example length
    c.data.text_column = "text"
    c.data.text_pair_column = ""
    c.data.label_column = "label"
    c.data.num_labels = 2  # classification classes (1: regression)
    c.data.label_names = ""  # comma-separated class names when labels are names (MNLI: contradiction,entailment,neutral)
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

    c.lock()
    return c


def load_preset(anchor: str, name: str) -> ml_collections.ConfigDict:
    """The config of recipe `name`.py in the folder of file `anchor` (recipes building on recipes)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(anchor)), f"{name}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such recipe")
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
        raise ValueError(f"{sequences_per_step} sequences a step do not split over data x fsdp = {per_micro}")
    c.parallel.data, c.parallel.fsdp, c.parallel.tensor = data, fsdp, tensor
    c.train.batch_size = per_micro
    c.train.micro_batches = sequences_per_step // per_micro
    c.train.output_dir = output_dir
    return c
