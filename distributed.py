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

import torch

RANK, WORLD, LOCAL = 0, 1, 0
_device = "cpu"


def init(device="cpu"):
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and, for CUDA, take the local rank's GPU. The
    process group itself is joined at the first collective (`connect`): by then every rank has loaded its planner,
    and what that built in the model cache was built by each (transformers' save_pretrained writes nothing on a rank
    other than 0 of a process group). Returns (rank, world)."""
    global RANK, WORLD, LOCAL, _device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return RANK, WORLD
    RANK, WORLD, LOCAL = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(LOCAL)
        _device = f"cuda:{LOCAL}"
    return RANK, WORLD


def connect():
    """Join the process group (nccl between GPUs, gloo between CPU processes), once."""
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if _device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(minutes=30))


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
    """Run a collective (joining the group first); a rank that stopped (killed, crashed) ends it with an error that
    says so."""
    try:
        connect()
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
    """Sum the gradients of `params` over ranks, in place, in one all_reduce. A parameter no rank has a gradient for
    keeps none (as in one process: the optimizer skips it); one that some rank lacks counts zeros there."""
    if WORLD == 1:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    had = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    flat = torch.cat([g.reshape(-1) for g in grads] + [had])
    _collective(dist.all_reduce, flat)
    for p, g, n in zip(params, flat.split([g.numel() for g in grads] + [len(params)]), flat[-len(params):].tolist()):
        p.grad = g.view_as(p).to(p.dtype) if n else None


def same_start(params):
    """Every rank's `params` set to rank 0's (one broadcast): LoRA's random init, the same on every rank only if
    every rank drew the same random numbers before it."""
    if WORLD == 1:
        return
    import torch.distributed as dist
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    _collective(dist.broadcast, flat, 0)
    with torch.no_grad():
        for p, v in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(v.view_as(p))


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if WORLD == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    _collective(dist.broadcast_object_list, box, 0)
    return box[0]


def close():
    if WORLD > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
