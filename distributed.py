"""
One run over several processes: `torchrun --nproc_per_node=N train.py` (one per GPU, or CPU processes), and
`--nnodes` for several machines. PyTorch's distributed package does all the communication: NCCL between GPUs,
gloo between CPU processes. Without torchrun (no WORLD_SIZE in the environment) there is one rank, no process group,
and every function here returns at once.

How train.py divides a GRPO step: every rank computes the step's B prompts (the same as one process would), takes
every world-th of them, samples and scores its groups, and backpropagates its part of the loss, scaled by the
step's total count of groups; the LoRA gradients are then summed over ranks (one all_reduce), so every rank clips
the same gradient and takes the same optimizer step. Groups never span ranks, so advantages stay per group. DDP
does not fit this: its gradient hooks need every rank to run the same number of backward passes, and a rank's
count here is its number of groups with signal. Each group samples from its own generator, seeded by (seed, step,
round, the prompt's place in the step), so a step's completions are the same whatever the number of ranks.
"""
import datetime
import os
from contextlib import contextmanager

import torch

RANK, WORLD, LOCAL = 0, 1, 0
_device = "cpu"


def init(device="cpu"):
    """Join torchrun's process group when there is one (the backend follows the device: nccl for CUDA, else
    gloo). Sets RANK, WORLD, LOCAL; returns (rank, world)."""
    global RANK, WORLD, LOCAL, _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return RANK, WORLD
    import torch.distributed as dist
    RANK, WORLD, LOCAL = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(LOCAL)
    _device = f"cuda:{LOCAL}" if cuda else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return RANK, WORLD


def local_device(device):
    """This rank's device: under torchrun each process on a machine takes the GPU of its local rank."""
    return f"cuda:{LOCAL}" if WORLD > 1 and torch.device(device).type == "cuda" else device


def is_main():
    """Whether this process writes the run folder and prints: rank 0."""
    return RANK == 0


def share(items):
    """This rank's share of a list: every WORLD-th item, from its rank on."""
    return items[RANK::WORLD]


def _collective(fn, *args):
    """Run a collective; a rank that stopped (killed, crashed) ends it with an error that says so."""
    try:
        return fn(*args)
    except (RuntimeError, ConnectionError) as e:
        why = str(e).strip().split("\n")[0][:200]
        raise SystemExit(f"error: rank {RANK} of {WORLD}: another rank stopped ({why}); the last checkpoint is in "
                         "the run folder, continue with --resume=True (with this or another number of ranks)") from e


def gather(mine, n):
    """The whole list of `n` items from every rank's `share` of it, in the original order."""
    if WORLD == 1:
        return list(mine)
    import torch.distributed as dist
    parts = [None] * WORLD
    _collective(dist.all_gather_object, parts, list(mine))
    out = [None] * n
    for r, part in enumerate(parts):
        out[r::WORLD] = part
    return out


def total(*values):
    """The sums over ranks of a few numbers (float64; inf and nan go through)."""
    if WORLD == 1:
        return values if len(values) > 1 else values[0]
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=_device)
    _collective(dist.all_reduce, t)
    out = tuple(t.tolist())
    return out if len(out) > 1 else out[0]


def sum_grads(params):
    """Sum the gradients of `params` over ranks, in place, in one all_reduce (a rank without a gradient for a
    parameter adds zeros)."""
    if WORLD == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective(dist.all_reduce, flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).to(p.dtype)


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if WORLD == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


@contextmanager
def rank0_first():
    """Rank 0 runs the block before the other ranks: what it builds in the model cache (the converted planner, its
    dequantized copy) they then find there. Built by all at once, a rank's copy would be incomplete: transformers'
    save_pretrained leaves the weights out on every rank but 0."""
    import torch.distributed as dist
    if WORLD > 1 and RANK:
        _collective(dist.barrier)
    yield
    if WORLD > 1 and not RANK:
        _collective(dist.barrier)


def close():
    if WORLD > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
