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
  still `batch_order(lengths, batch_size × grad_accum × N, seed, epoch)`: the examples of each
  optimizer step, a pure function of (seed, epoch, examples per step), the same on every
  process; each step is cut into global micro-batches of batch_size × N and each process takes
  its contiguous slice of each (`rank_examples`). So N processes × batch_size b see exactly the
  steps of 1 process × batch_size N·b (or b × grad_accum N), nothing dropped or repeated, and a
  resume replays them.
- Loss. The window's loss units U (trained tokens for SFT) are summed over processes
  before the forward passes, so the normaliser is global; see `loss_scale` for why the
  loss is multiplied by N.
- Decisions that change which collectives run next (stop at a step boundary, generate
  samples) are taken by all processes together (`any_process`).
- Writes. Only the main process writes the run directory (metrics, progress, checkpoints,
  final/, report); sharded state is gathered first (`gathered`), which every process must
  call. Checkpoints also hold each process's torch generators and the process count.

One module per audience; import the one you need (`from ftkit.distributed import collectives`):

    launch        `ftkit train --nproc N` through torch.distributed.run; who am I (rank, world_size).
                  Imports no torch at module level: the CLI imports it before deciding to spawn.
    engines       the Accelerator with the strategy's plugin (build_accelerator, fsdp_plugin,
                  deepspeed_config), prepare (wrap / shard), describe, check_method_hooks
    collectives   what the loop and objectives do together: rank_slice / rank_examples,
                  loss_scale, global_sums / any_process, micro_step / backward, grad_norm,
                  is_sharded / is_deepspeed / local_tensor, own_dir
    state         full state for saving (gathered), each process's generators (rank_rng_states /
                  restore_rank_rng), check_processes, and putting read checkpoint tensors back
                  into shards (restore_sharded / restore_deepspeed; ftkit.train.resume reads them)

This file holds only what every module shares and stays light (importing a submodule runs it).
"""

from __future__ import annotations

from ftkit.errors import FtkitError


class DistributedError(FtkitError):
    """The processes cannot be set up as the recipe and command line ask."""

    exit_code = 2
