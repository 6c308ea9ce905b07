"""Past one GPU: the recipe's `distributed` section turned into engines that already exist.

Every process runs the same loop; what changes with N processes is who holds which state,
and that is an engine's job, never ftkit's:

    ddp        torch DistributedDataParallel (through accelerate): each process holds the
               whole model; gradients are averaged after the window's last backward.
    fsdp       torch FSDP2 `fully_shard`: one shard unit per decoder layer, the embeddings,
               the final norm + head, and the root; weights, gradients and optimizer state
               split over the processes (ZeRO-3's split). On GPUs through accelerate's
               FullyShardedDataParallelPlugin; on CPU accelerate keeps FSDP to accelerators,
               so ftkit calls the same `fully_shard` with the same units itself (that is how
               the tests run it, on gloo).
    deepspeed  DeepSpeed ZeRO 1/2/3 through accelerate's DeepSpeedPlugin, with the config
               generated from the recipe (`deepspeed_config`): batch sizes and gradient
               accumulation have one source of truth. On GPUs (nccl) or CPU processes
               (DeepSpeed's CPU accelerator on gloo, how the tests run it). Checkpoints are
               ftkit's own: full fp32 weights and Adam moments gathered from ZeRO's
               partitions (DeepSpeed's format is pickle).

The contract that makes N processes equal one:

- Data. `train.batch_size` is per process (micro-batch per forward). The global order is
  still `batch_order(lengths, batch_size × N, seed, epoch)`: a pure function of (seed,
  epoch), the same on every process, and each process takes its contiguous slice of each
  global micro-batch (`rank_examples`). So N processes × batch_size b see exactly the
  batches of 1 process × batch_size N·b, nothing dropped or repeated, and a resume replays them.
- Loss. The window's loss units U (trained tokens for SFT) are summed over processes
  before the forward passes, so the normaliser is global; see `loss_scale` for why the
  loss is multiplied by N.
- Decisions that change which collectives run next (stop at a step boundary, generate
  samples) are taken by all processes together (`any_process`).
- Writes. Only the main process writes the run directory (metrics, progress, checkpoints,
  final/, report); sharded state is gathered first (`gathered`), which every process must
  call. Checkpoints also hold each process's torch generators and the process count.

    build_accelerator(recipe, mixed_precision)   Accelerator with the strategy's plugin
    prepare(accelerator, recipe, model, opt)     wrap / shard model and optimizer
    restore(accelerator, path, model, opt)       resume their state, shard-aware
    deepspeed_config(recipe, world, precision)   the DeepSpeed JSON, from the recipe
    fsdp_plugin(recipe)                          accelerate's FSDP2 plugin, from the recipe
    rank_slice / rank_examples                   this process's part of a global micro-batch
    global_sums / any_process                    all-reduce of a few floats / of a flag
    micro_step / backward                        one forward/backward of a window
    gathered(accelerator, model, optimizer)      full state on the main process, for saving
    rank_rng_states / restore_rank_rng           each process's generators in the checkpoint
    check_processes / check_method_hooks         refusals: another --nproc on resume, hooks on shards
    needs_launch / launch / hand_over_failure    `ftkit train --nproc N` through torch.distributed.run
    sharded_state_bytes(...)                     per-GPU memory of weights/grads/optimizer (ZeRO split)

Imports stay light at module level: the CLI imports this before deciding to spawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError

#: keys of the DeepSpeed config that ftkit derives from the recipe; a user file may not disagree
DEEPSPEED_OWNED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "zero_optimization.stage",
    "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device",
)

#: set by torchrun / accelerate launch in every process they start
LAUNCHER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
#: where processes started by `launch` leave their failure for it (a temporary directory)
FAILURE_DIR_ENV = "FTKIT_FAILURE_DIR"


class DistributedError(FtkitError):
    """The processes cannot be set up as the recipe and command line ask."""

    exit_code = 2


# --------------------------------------------------------------------------- launching


def is_launched() -> bool:
    """True inside a process started by torchrun / accelerate launch / `ftkit train --nproc`."""
    return all(key in os.environ for key in LAUNCHER_ENV)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def needs_launch(recipe: Any, nproc: int | None) -> bool:
    """Whether `ftkit train` must start its processes through torch.distributed.run.

    Yes for `--nproc N` with N > 1, for deepspeed always and for fsdp on a GPU even with one
    process: both engines need a process group (one GPU with ZeRO offload is a real use). No
    inside a process a launcher already started (then --nproc must not be given).
    """
    if is_launched():
        if nproc is not None:
            raise DistributedError(
                f"--nproc {nproc}: this process was started by a launcher already (WORLD_SIZE={world_size()}); "
                "drop --nproc, the launcher decides the number of processes"
            )
        return False
    import torch

    if nproc is not None and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise DistributedError(
            f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) visible; start at most one process per GPU"
        )
    if nproc is not None and nproc > 1:
        return True
    strategy = recipe.distributed.strategy
    return strategy == "deepspeed" or (strategy == "fsdp" and torch.cuda.is_available())


def argv_without_nproc(argv: Sequence[str]) -> list[str]:
    """`argv` with `--nproc N` / `--nproc=N` removed: what each started process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run `python -m ftkit ARGV` in `nproc` processes on this machine; return the exit code.

    Uses torch.distributed.run (torchrun) in this process, standalone rendezvous on a free
    local port. When a process fails, torchrun stops the others, which may fail too (their
    peers are gone); each failing process hands its one-line cause to this launcher
    (`hand_over_failure`), which prints the earliest one, the root cause, and returns its
    exit code (2 bad input, 1 runtime, 3 non-finite ...). Multi-node runs use torchrun
    directly (README).
    """
    import logging
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if "OMP_NUM_THREADS" not in os.environ:
        # torchrun would set 1 and print a banner; on CPU give each process its share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    # torchrun's agent logs every worker start, stop and failure; the root cause is printed below
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "ftkit", *argv_without_nproc(argv)]
    )
    failures = Path(tempfile.mkdtemp(prefix="ftkit-launch-"))
    os.environ[FAILURE_DIR_ENV] = str(failures)
    try:
        run(args)
    except ChildFailedError as err:
        reports = [json.loads(path.read_text()) for path in sorted(failures.glob("rank-*.json"))]
        if reports:
            first = min(reports, key=lambda report: report["time"])
            print(first["message"], file=sys.stderr)
            return int(first["exit_code"])
        failed_rank, failure = err.get_first_failure()
        if failure.exitcode < 0:
            print(f"error: process {failed_rank} was killed by signal {-failure.exitcode}", file=sys.stderr)
            return 128 - failure.exitcode
        print(f"error: process {failed_rank} exited with code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode
    except KeyboardInterrupt:
        return 130
    finally:
        os.environ.pop(FAILURE_DIR_ENV, None)
        shutil.rmtree(failures, ignore_errors=True)
    return 0


def hand_over_failure(message: str, exit_code: int) -> bool:
    """Called by a failing process with its one-line cause; True when it must not print it.

    Under `ftkit train --nproc` the line goes to the launcher, which prints only the first
    failure in time (the others are its consequences). Under another launcher every
    process reads the same recipe and data, so a bad-input error (exit 2) is printed by
    rank 0 only; runtime failures by the process that has them.
    """
    failures = os.environ.get(FAILURE_DIR_ENV)
    if failures and is_launched():
        import time

        report = {"time": time.time(), "rank": rank(), "exit_code": exit_code, "message": message}
        (Path(failures) / f"rank-{rank()}.json").write_text(json.dumps(report))
        return True
    return is_launched() and exit_code == 2 and rank() != 0


# --------------------------------------------------------------------------- engines


def build_accelerator(recipe: Any, mixed_precision: str) -> Any:
    """An `accelerate.Accelerator` set up for `recipe.distributed`.

    The recipe is the one source of truth: when a launcher's accelerate config (env
    ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED) names another strategy, DistributedError.
    fsdp on CPU gets no plugin (accelerate runs FSDP only on accelerators); `prepare` shards.
    """
    import torch
    from accelerate import Accelerator

    d = recipe.distributed
    launched_as = _launcher_strategy()
    if launched_as is not None and launched_as != d.strategy:
        raise DistributedError(
            f"distributed.strategy: the launcher's accelerate config uses {launched_as}, the recipe says {d.strategy}; "
            f"set distributed.strategy: {launched_as} in the recipe (ftkit takes the strategy from the recipe)"
        )
    kwargs: dict[str, Any] = {"mixed_precision": mixed_precision}
    on_gpu = torch.cuda.is_available()
    if is_launched() and not on_gpu:
        kwargs["cpu"] = True  # accelerate starts a CPU (gloo) process group only when told it is on CPU
    if d.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, is_deepspeed_available

        if not is_deepspeed_available():
            raise DistributedError("distributed.strategy: deepspeed needs DeepSpeed: pip install 'ftkit[deepspeed]'")
        config = deepspeed_config(recipe, world_size(), mixed_precision)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
        # accelerate checks the DeepSpeed config's accumulation against its own; it does not divide
        # the loss by it under DeepSpeed (the loop normalises by tokens, see `backward`)
        kwargs["gradient_accumulation_steps"] = recipe.train.grad_accum
        if not on_gpu:
            # accelerate ignores the DeepSpeed plugin when told cpu=True, and without a backend it
            # counts one process; DeepSpeed's CPU accelerator runs on gloo when oneCCL is absent
            kwargs.pop("cpu", None)
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
        accelerator = Accelerator(**kwargs)  # DeepSpeed's logs and prints: stderr (ftkit.io, for every command)
        # accelerate registers the config with transformers whatever zero3_init_flag says, and under
        # ZeRO-3 transformers then partitions weights while loading (deepspeed.zero.Init): a
        # collective every process must join, but ftkit loads on the main process first
        # (`model_source`). So each process loads the whole model and `prepare` partitions it, and
        # registers the config again (generate's synced_gpus needs it under ZeRO-3).
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        return accelerator
    elif d.strategy == "fsdp" and on_gpu:
        kwargs["fsdp_plugin"] = fsdp_plugin(recipe)
        if d.sharding == "hybrid":
            from accelerate.parallelism_config import ParallelismConfig

            nodes, per_node = _nodes()
            kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=nodes, dp_shard_size=per_node)
    return Accelerator(**kwargs)


def _launcher_strategy() -> str | None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return None


def _nodes() -> tuple[int, int]:
    """(nodes, processes per node) from torchrun's environment."""
    world = world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise DistributedError(
            f"distributed.sharding: hybrid needs equal nodes; {world} processes, {per_node} per node"
        )
    return world // per_node, per_node


def fsdp_plugin(recipe: Any) -> Any:
    """accelerate's FSDP2 plugin for the recipe.

    One shard unit per decoder layer (the classes in the model's `_no_split_modules`),
    weights resharded after forward (full sharding), CPU offload of weights, gradients and
    the optimizer step with `offload: params`. Mixed precision comes from
    `train.mixed_precision` through the Accelerator (bf16 compute, fp32 gradient reduction).
    Every field that would otherwise be read from FSDP_* environment variables is set here.
    """
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        reshard_after_forward=True,
        cpu_offload=recipe.distributed.offload == "params",
        state_dict_type="FULL_STATE_DICT",
        activation_checkpointing=False,  # model.gradient_checkpointing does it, through transformers
        cpu_ram_efficient_loading=False,
    )


def deepspeed_config(recipe: Any, world: int, mixed_precision: str) -> dict:
    """The DeepSpeed config for the recipe; batch geometry and precision come from the recipe only.

        train_micro_batch_size_per_gpu = train.batch_size
        gradient_accumulation_steps    = train.grad_accum
        train_batch_size               = batch_size × grad_accum × processes (DeepSpeed checks this identity)
        gradient_clipping              = train.max_grad_norm (0 = off)
        zero_optimization.stage        = distributed.zero_stage; offload of optimizer / params to CPU
        bf16 / fp16                    = train.mixed_precision as resolved

    With `distributed.deepspeed_config` its other settings are kept; a key above with another
    value there (other than "auto") is a DistributedError naming the file and key.
    """
    d, t = recipe.distributed, recipe.train
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ must hold whole weights
    ours = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.batch_size * t.grad_accum * world,
        "gradient_clipping": float(t.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # ftkit passes torch AdamW, which ZeRO runs fine
        # with offload, torch AdamW steps the CPU partitions (the recipe's optimizer, the same maths
        # as one process) instead of DeepSpeed's compiled CPU Adam
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # progress is ftkit's; DeepSpeed would print to stdout
    }
    if d.deepspeed_config is None:
        return ours
    path = Path(d.deepspeed_config)
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DistributedError(f"distributed.deepspeed_config: cannot read {path}: {err}") from None
    if not isinstance(theirs, dict):
        raise DistributedError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    conflicts = []
    for key in DEEPSPEED_OWNED_KEYS:
        mine, given = _get(ours, key), _get(theirs, key)
        if given not in (None, "auto") and given != mine and not (key.endswith(".device") and given == "none" == mine):
            conflicts.append(f"{key} is {json.dumps(given)} there, {json.dumps(mine)} from the recipe")
    if conflicts:
        raise DistributedError(
            f"distributed.deepspeed_config: {path}: {'; '.join(conflicts)}; remove these keys (or set them to "
            '"auto"): batch sizes, accumulation, clipping, precision and ZeRO stage/offload come from the recipe'
        )
    return _merge(theirs, ours)


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def prepare(accelerator: Any, recipe: Any, model: Any, optimizer: Any) -> tuple[Any, Any]:
    """Wrap or shard the model and optimizer for the strategy; returns the objects the loop uses.

    Everything goes through `accelerator.prepare`, except fsdp on CPU (accelerate would
    wrap the model in DDP there): the model is sharded with torch's `fully_shard`, one unit
    per decoder layer, embeddings, norm + head, and the root; the optimizer, which holds no
    state yet, is pointed at the sharded parameters (FSDP2 replaces every parameter with a
    DTensor of the same name).
    """
    if is_deepspeed(accelerator):
        prepared = accelerator.prepare(model, optimizer)  # deepspeed.initialize: its logs go to stderr (ftkit.io)
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # see build_accelerator
        return prepared
    sharding = recipe.distributed.strategy == "fsdp" and accelerator.num_processes > 1
    if not sharding or _is_accelerate_fsdp(accelerator):
        return accelerator.prepare(model, optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    _fully_shard_cpu(model, recipe, accelerator)
    sharded = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return model, accelerator.prepare(optimizer)


def restore(accelerator: Any, path: Path, model: Any, optimizer: Any) -> None:
    """Load weights and optimizer state from checkpoint `path` into the prepared model and optimizer.

    DeepSpeed: `_restore_deepspeed`. Replicated models: ftkit.train.resume's `restore`.
    Sharded (FSDP) models: every process
    reads the full tensors and keeps its shard, through torch.distributed.checkpoint's
    `set_model_state_dict` / `set_optimizer_state_dict` (full state dicts, as `gathered`
    saved them). Adapter tensors are saved under peft's names; the names of the model's
    parameters are found by asking peft how it names them (`get_peft_model_state_dict`).
    """
    if is_deepspeed(accelerator):
        _restore_deepspeed(accelerator, path, model, optimizer)
        return
    if not is_sharded(model):
        from ftkit.train.resume import restore as restore_replicated

        restore_replicated(path, accelerator.unwrap_model(model), optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from ftkit.errors import RunDirError

    saved = _saved_weights(path)
    names = _parameter_names(model, saved)
    unknown = sorted(set(saved) - set(names))
    if unknown:
        raise RunDirError(f"{path}: tensors the model does not have: {', '.join(unknown[:3])}")
    full = {names[key]: tensor for key, tensor in saved.items()}
    absent = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in full)
    if absent:
        raise RunDirError(f"{path}: no saved weights for trainable {', '.join(absent[:3])}; is this the same method?")
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    _load_sharded_optimizer(model, optimizer, path)


def _saved_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    if (path / "adapter_config.json").is_file():
        return load_file(path / "adapter_model.safetensors")
    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else []
    state = {}
    for shard in shards or ["model.safetensors"]:
        state.update(load_file(path / shard))
    return state


def _parameter_names(model: Any, saved: dict) -> dict[str, str]:
    """{name in the checkpoint: name in the model}: peft renames adapter tensors when it saves them."""
    current = model.state_dict()  # sharded tensors, no gathering
    if not hasattr(model, "peft_config"):
        return {key: key for key in saved if key in current}
    from peft import get_peft_model_state_dict

    by_identity = {id(tensor): name for name, tensor in current.items()}
    as_saved = get_peft_model_state_dict(model, state_dict=current)
    return {key: by_identity[id(tensor)] for key, tensor in as_saved.items() if id(tensor) in by_identity}


def _load_sharded_optimizer(model: Any, optimizer: Any, path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from ftkit.errors import RunDirError
    from ftkit.train.checkpoint import load_optimizer_state

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    try:
        set_optimizer_state_dict(
            model, inner, load_optimizer_state(path), options=StateDictOptions(full_state_dict=True)
        )
    except (KeyError, ValueError, RuntimeError) as err:
        raise RunDirError(f"{path}: the optimizer state does not fit this sharded optimizer ({err})") from None


def check_method_hooks(accelerator: Any, recipe: Any, hooks: Any) -> None:
    """Refuse a method's own training hooks under a strategy that splits tensors over processes.

    Hooks such as AdaLoRA's budget reallocation, LoRA-FA's projected-gradient optimizer or
    PiSSA's final conversion read whole weights and gradients; under fsdp / deepspeed each
    process holds only a shard. Under ddp every process holds everything and the gradients
    are already averaged when the hooks run, so they run unchanged. Parameter groups
    (LoRA+) are fine everywhere.
    """
    strategy = recipe.distributed.strategy
    if strategy == "ddp":
        return
    own = [
        name
        for name in ("optimizer", "before_zero_grad", "after_step", "regularizer", "save_final", "state")
        if getattr(hooks, name)
    ]
    if own:
        raise DistributedError(
            f"method.name: {recipe.method.name} runs its own training hooks ({', '.join(own)}) on whole tensors, "
            f"which distributed.strategy {strategy} splits over processes; use distributed.strategy: ddp"
        )


@contextlib.contextmanager
def own_dir(accelerator: Any, run_dir: Path) -> Iterator[Path]:
    """The run directory on the main process; elsewhere a temporary directory, removed after.
    For steps that write files beside their work (DPO's precomputed reference): written once."""
    if accelerator.is_main_process:
        yield run_dir
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftkit-process-") as tmp:
        yield Path(tmp)


def describe(accelerator: Any, recipe: Any) -> str:
    """' · 2 processes (fsdp)' for the start-up line; empty for one process."""
    n = accelerator.num_processes
    return f" · {n} processes ({recipe.distributed.strategy})" if n > 1 else ""


def _is_accelerate_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _fully_shard_cpu(model: Any, recipe: Any, accelerator: Any) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    if not layer_classes:
        raise DistributedError(
            f"distributed.strategy: fsdp needs the model's decoder layer class (_no_split_modules); "
            f"{type(model).__name__} names none"
        )
    kwargs: dict[str, Any] = {}
    if accelerator.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if recipe.distributed.sharding == "hybrid":
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh("cpu", _nodes(), mesh_dim_names=("replicate", "shard"))
    # 4-bit weights packed in uint8 do not survive the conversion to DTensor (their quant_state
    # is lost): like accelerate, keep them whole on every process and shard the rest
    packed = {p for p in model.parameters() if type(p).__name__ == "Params4bit" and not p.is_floating_point()}
    if packed:
        kwargs["ignored_params"] = packed
    for module in list(model.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module, **kwargs)
    # Embeddings and the final norm + head are units of their own, as accelerate makes them:
    # their hooks then fire on their own forward, also in `generate`, which bypasses the root's.
    embed = model.get_input_embeddings()
    tail = [m for m in (getattr(model.get_decoder(), "norm", None), model.get_output_embeddings()) if m is not None]
    if embed is not None and all(embed.weight is not m.weight for m in tail if hasattr(m, "weight")):
        fully_shard(embed, **kwargs)
    if tail:
        fully_shard(tail, **kwargs, reshard_after_forward=False)  # used at once by backward: keep gathered
    fully_shard(model, **kwargs)


def is_sharded(model: Any) -> bool:
    """True for a model whose parameters are split over processes (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_tensor(tensor: Any) -> Any:
    """This process's part of a (possibly sharded) tensor, which checks such as isfinite run on: a
    DTensor's local shard (FSDP2), a ZeRO-3 parameter's partition (`ds_tensor`: the parameter itself
    is an empty placeholder between forward passes), else the tensor itself."""
    if hasattr(tensor, "to_local"):
        return tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    return partition if partition is not None else tensor


# --------------------------------------------------------------------------- the loop's side


def rank_slice(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """Process `rank`'s contiguous part of a global micro-batch (part sizes differ by at most one).

    Concatenating the parts of ranks 0 … world-1 gives `indices` back: nothing is dropped or
    repeated. With world = 1 it is `indices`.
    """
    n = len(indices)
    return list(indices[rank * n // world : (rank + 1) * n // world])


def rank_examples(examples: Sequence[Any], indices: Sequence[int], rank: int, world: int) -> tuple[list[Any], float]:
    """(examples, weight) of this process's slice of a global micro-batch.

    A global batch smaller than the number of processes (the last one of an epoch can be)
    leaves some slices empty. Such a process still runs one forward/backward, because every
    process must join the same collectives: on the batch's last example with weight 0,
    which the loop applies to its loss, units, metrics and tokens, so it adds nothing. The
    weight works for every objective (SFT examples, preference pairs ...).
    """
    part = rank_slice(indices, rank, world)
    if part:
        return [examples[i] for i in part], 1.0
    return [examples[indices[-1]]], 0.0


def loss_scale(accelerator: Any) -> int:
    """The factor on each process's loss: the number of processes N.

    Each process's loss is (its window's loss sum) / U, U = the loss units of the whole
    window summed over all processes. DDP, FSDP and ZeRO all *average* gradients over the
    processes, g = (1/N) Σ_r g_r, so scaling each process's loss by N gives
    g = Σ_r ∇(loss sum_r) / U = ∇(loss sum of the global window) / U: exactly the
    one-process gradient of the same global window.
    """
    return accelerator.num_processes


def any_process(accelerator: Any, flag: bool) -> bool:
    """True on every process when `flag` is True on any: decisions that change which
    collectives run next (stop at this step boundary, generate samples) must be the same everywhere."""
    return bool(flag) if accelerator.num_processes == 1 else global_sums(accelerator, [float(bool(flag))])[0] > 0


def global_sums(accelerator: Any, values: Sequence[float]) -> list[float]:
    """Sum `values` (same length and order on every process) over all processes, in float64."""
    if accelerator.num_processes == 1:
        return list(values)
    import torch

    tensor = torch.tensor(list(values), dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction="sum").tolist()


@contextlib.contextmanager
def micro_step(accelerator: Any, model: Any, is_last: bool) -> Iterator[None]:
    """One forward/backward of an accumulation window.

    Gradients are synchronised over processes on the window's last backward only; before
    that they accumulate locally (the same sum, one all-reduce or reduce-scatter per step
    instead of one per micro-step). `accelerator.sync_gradients` tells DeepSpeed where the
    boundary is, since it steps its engine inside backward; accelerate's optimizer steps
    only when it is True, which the last micro-step leaves it.
    """
    accelerator.sync_gradients = is_last
    if is_last or accelerator.num_processes == 1:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: Any, loss: Any) -> None:
    """`accelerator.backward`; under DeepSpeed without its division by grad_accum, because the
    loop's loss is already divided by the window's loss units."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def grad_norm(accelerator: Any, params: Sequence[Any], max_norm: float | None) -> float:
    """The window's global gradient norm, clipped to `max_norm` when given.

    Under DeepSpeed the engine has already clipped (config gradient_clipping = train.max_grad_norm)
    and stepped inside the window's last backward, and ZeRO keeps the gradients in its own
    partitions (`p.grad` is None), so the norm is the engine's, read through accelerate.
    """
    if max_norm is not None or is_deepspeed(accelerator):
        return float(accelerator.clip_grad_norm_(params, max_norm or 0.0))
    import torch

    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))


# --------------------------------------------------------------------------- saving


class GatheredModel:
    """Stands in for a sharded model where ftkit saves one: `save_pretrained` writes the
    gathered full state dict with the model's own (transformers / peft) `save_pretrained`."""

    def __init__(self, model: Any, state_dict: dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, out_dir: Any, **kwargs: Any) -> None:
        self.model.save_pretrained(out_dir, state_dict=self.state_dict, **kwargs)


class GatheredOptimizer:
    """Stands in for a sharded optimizer where ftkit saves one: `state_dict` is the gathered
    full state (keyed by parameter name, as torch.distributed.checkpoint gives it)."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def gathered(accelerator: Any, model: Any, optimizer: Any = None) -> tuple[Any, Any]:
    """(model, optimizer) as the main process saves them; every process must call this.

    Replicated (ddp, one process): the unwrapped model and the optimizer themselves.
    FSDP: full state dicts gathered to the main process's CPU through
    `torch.distributed.checkpoint.state_dict` (what accelerate's `get_state_dict` uses for
    FSDP2), wrapped so ftkit's pickle-free savers write them. DeepSpeed: the weights
    through `accelerator.get_state_dict` (ZeRO-3 consolidates them), the trainable ones
    replaced by their fp32 masters, and the optimizer state in the same by-name layout
    (`_deepspeed_full_state`).
    """
    from accelerate.utils import DistributedType

    unwrapped = accelerator.unwrap_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(model, options=options)
        optim = None
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            optim = GatheredOptimizer(get_optimizer_state_dict(model, inner, options=options))
        return GatheredModel(unwrapped, weights), optim
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        weights = accelerator.get_state_dict(model)  # ZeRO-3: the 16-bit weights consolidated on the main process
        if optimizer is None:
            return GatheredModel(unwrapped, weights), None
        masters, state = _deepspeed_full_state(unwrapped, optimizer)
        # the checkpoint holds the fp32 master weights of what trains (bit-exact resume under bf16 too)
        weights = {**weights, **masters} if accelerator.is_main_process else weights
        return GatheredModel(unwrapped, weights), GatheredOptimizer(state)
    return unwrapped, optimizer


def _deepspeed_full_state(unwrapped: Any, optimizer: Any) -> tuple[dict, dict]:
    """({name: fp32 master weight}, full optimizer state keyed by parameter name) of every
    trainable parameter, assembled from ZeRO's partitions with DeepSpeed's public
    `deepspeed.utils.safe_get_full_*` (collectives: every process calls this, in the same order).

    The optimizer state has the layout of torch.distributed.checkpoint's full state dict
    (as under fsdp): {"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]},
    so it is written by ftkit's pickle-free checkpoint code like any other.
    """
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    base = _deepspeed_base_optimizer(optimizer)
    steps = [entry["step"] for entry in base.state.values() if "step" in entry]
    step = torch.as_tensor(steps[0], dtype=torch.float32).cpu() if steps else None
    masters, state = {}, {}
    for name, param in unwrapped.named_parameters():
        if not param.requires_grad:
            continue
        masters[name] = safe_get_full_fp32_param(param).detach().cpu()
        if step is None:  # no step yet: no optimizer state
            continue
        state[name] = {"step": step.clone()} | {
            key: safe_get_full_optimizer_state(param, key).detach().cpu() for key in ("exp_avg", "exp_avg_sq")
        }
    groups = [{key: value for key, value in group.items() if key != "params"} for group in base.param_groups]
    groups[0]["params"] = list(state)  # ZeRO flattens the groups' parameters; the states are per name
    for group in groups[1:]:
        group["params"] = []
    return masters, {"state": state, "param_groups": groups}


def _deepspeed_base_optimizer(optimizer: Any) -> Any:
    """The torch optimizer ZeRO steps on its flat fp32 partitions
    (accelerate's wrapper → DeepSpeed's ZeRO optimizer → torch's)."""
    return optimizer.optimizer.optimizer


def _restore_deepspeed(accelerator: Any, path: Path, model: Any, optimizer: Any) -> None:
    """Put checkpoint `path` (written by `gathered`) back into ZeRO's partitions, exactly.

    ZeRO creates the optimizer state at its first step, so: (1) the fp32 master weights are
    set (`safe_set_full_fp32_param`); (2) one step with lr 0 on a zero loss runs: with zero
    gradients AdamW changes no weight (lr × 0 / (0 + eps) = 0, decay × lr = 0), creates the
    state and copies the masters into the model's (possibly partitioned) weights; (3) the
    moments and the step count are set (`safe_set_full_optimizer_state`; the step on the
    torch optimizer's state). Every process runs this (collectives); the zero step draws
    from the generators, which the caller restores afterwards.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from ftkit.errors import RunDirError
    from ftkit.train.checkpoint import load_optimizer_state

    unwrapped = accelerator.unwrap_model(model)
    saved = _saved_weights(path)
    names = _parameter_names(unwrapped, saved)
    full = {names[key]: tensor for key, tensor in saved.items() if key in names}
    trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    absent = [name for name, _ in trainable if name not in full]
    if absent:
        raise RunDirError(f"{path}: no saved weights for trainable {', '.join(absent[:3])}; is this the same method?")
    states = load_optimizer_state(path)["state"]
    if any(name not in states for name, _ in trainable):
        raise RunDirError(f"{path}: the optimizer state does not name this run's trainable parameters")
    device = accelerator.device
    for name, param in trainable:
        safe_set_full_fp32_param(param, full[name].to(device, torch.float32))

    for group in optimizer.param_groups:
        group["lr"] = 0.0  # the loop sets the step's LR before its next step
    ids = torch.tensor([[1, 2, 3]], device=device)
    accelerator.sync_gradients = True  # the engine steps inside this backward
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum() * 0.0
    accelerator.backward(loss, scale_wrt_gas=False)

    for name, param in trainable:
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(param, states[name][key].to(device, torch.float32), key)
    step = float(states[trainable[0][0]]["step"])
    base = _deepspeed_base_optimizer(optimizer)
    for entry in base.state.values():
        entry["step"] = torch.full_like(torch.as_tensor(entry["step"]), step)


def rank_rng_states(accelerator: Any) -> dict:
    """{"processes": N, "rng_ranks": [hex, ...]} for the checkpoint (every process must call it).

    Each process draws its own dropout masks, so its torch generators (CPU, and its own
    CUDA device) differ from the main process's after the first step; they are gathered
    here so a resume gives every process back its own (`restore_rank_rng`). The number of
    processes is saved too: the global batch is batch_size × processes, so a resume with
    another count would be another trajectory (`check_processes`). Empty for one process.
    """
    if accelerator.num_processes == 1:
        return {}
    state = _rng_bytes(accelerator).to(accelerator.device)
    gathered_states = accelerator.gather(state.unsqueeze(0)).cpu()
    return {"processes": accelerator.num_processes, "rng_ranks": [bytes(row.tolist()).hex() for row in gathered_states]}


def _rng_bytes(accelerator: Any) -> Any:
    import torch

    parts = [torch.get_rng_state()]
    if accelerator.device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(accelerator.device))
    return torch.cat(parts)


def restore_rank_rng(accelerator: Any, saved: dict) -> None:
    """Give this process back its own torch generator states from the checkpoint's trainer state.
    Call after ftkit.train.checkpoint.restore_rng, which restores the main process's."""
    ranks = saved.get("rng_ranks")
    if not ranks or accelerator.num_processes == 1:
        return
    import torch

    state = torch.tensor(list(bytes.fromhex(ranks[accelerator.process_index])), dtype=torch.uint8)
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size])
    if accelerator.device.type == "cuda":
        torch.cuda.set_rng_state(state[cpu_size:], accelerator.device)


def check_processes(accelerator: Any, saved: dict) -> None:
    """Refuse to resume with another number of processes than the checkpoint was written with."""
    from ftkit.errors import RunDirError

    before, now = int(saved.get("processes", 1)), accelerator.num_processes
    if before != now:
        raise RunDirError(
            f"--resume: the checkpoint was written by {before} process(es), this run has {now}; the global batch is "
            f"train.batch_size × processes, so resume with --nproc {before} (or start a new run)"
        )


def model_source(accelerator: Any, model_cfg: Any, run_base: Path) -> Any:
    """The model section this process loads: a built-in model is written once, by the main
    process, into the run's base/ (transformers saves on rank 0 only); the others load that
    directory. Call inside `accelerator.main_process_first()`."""
    from ftkit.models.builtin import is_builtin

    if accelerator.is_main_process or not is_builtin(model_cfg.name):
        return model_cfg
    return model_cfg.model_copy(update={"name": str(run_base)})


# --------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes of training state per process: on the GPU, and moved to CPU RAM by offload."""

    weights: float
    gradients: float
    optimizer: float
    cpu: float = 0.0

    @property
    def gpu(self) -> float:
        return self.weights + self.gradients + self.optimizer


def sharded_state_bytes(
    weights: float,
    gradients: float,
    optimizer: float,
    strategy: str,
    n_gpus: int,
    zero_stage: int = 2,
    offload: str = "none",
    sharding: str = "full",
    gpus_per_node: int | None = None,
) -> StateBytes:
    """Per-GPU bytes of weights, gradients and optimizer state when N GPUs share the work.

    Inputs are the one-GPU totals (frozen weights count in `weights` only). ZeRO
    (Rajbhandari et al., 2020, fig. 1): mixed-precision Adam on Ψ parameters holds 2Ψ
    16-bit weights + 2Ψ 16-bit gradients + KΨ optimizer state (K = 12: fp32 master
    weights, momentum, variance); over N data-parallel GPUs, per GPU

        ddp            2Ψ + 2Ψ + KΨ                 (replicated)
        ZeRO-1 (P_os)  2Ψ + 2Ψ + KΨ/N
        ZeRO-2 (+g)    2Ψ + (2 + K)Ψ/N
        ZeRO-3 (+p)    (2 + 2 + K)Ψ/N
        fsdp full      as ZeRO-3; hybrid: N = GPUs per node (replicated across nodes)

    e.g. Ψ = 7.5B, N = 64: 120 GB, 31.4 GB, 16.6 GB, 1.9 GB. Offload moves the optimizer
    state (`optimizer`), or weights and optimizer state (`params`; fsdp moves the
    gradients too), per process, to CPU RAM. Activations are not state and are not split.
    """
    n = max(1, n_gpus)
    if strategy == "fsdp":
        n = min(n, gpus_per_node or n) if sharding == "hybrid" else n
        split = (True, True, True)
    elif strategy == "deepspeed":
        split = (zero_stage >= 3, zero_stage >= 2, zero_stage >= 1)
    else:
        split = (False, False, False)
    w, g, o = (v / n if is_split else v for v, is_split in zip((weights, gradients, optimizer), split, strict=True))
    cpu = 0.0
    if offload in ("optimizer", "params"):
        cpu, o = cpu + o, 0.0
    if offload == "params":
        cpu, w = cpu + w, 0.0
        if strategy == "fsdp":
            cpu, g = cpu + g, 0.0
    return StateBytes(weights=w, gradients=g, optimizer=o, cpu=cpu)
