"""Several processes under torchrun: the process group, ranks, collectives, and the share of a batch each rank
trains. A plain `python run.py` is one process with no group, and every helper here is then the identity."""
import contextlib
import os

import torch

from utils import UserError


def init_distributed():
    """Join the process group torchrun describes in the environment (NCCL for CUDA tensors, gloo for CPU); a plain
    `python run.py` has no WORLD_SIZE and stays a single process with no group at all."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")  # small CPU reductions use gloo


def rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a download, a cache write); the other ranks run it once it has finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def everyone(flag):
    """True when `flag` is true on every rank (the flag itself in a single process)."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0


def on_main(fn):
    """Run `fn` on rank 0 alone (writing results), then tell every rank whether it worked: if it failed there, the
    other ranks stop too instead of waiting at the next collective until torchrun's timeout. Returns fn's result
    (None on the other ranks)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # an interrupt too: the other ranks must not be left waiting
            error = e
    if not everyone(error is None):
        raise error if error is not None else UserError(f"rank {rank()}: stopping, rank 0 failed (its line says why)")
    return result


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (`obj` itself in a single process)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values):
    """Sum a list of numbers over all ranks (the identity in a single process)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def rank_share(index):
    """This rank's rows of a global batch and whether they count (the whole batch in a single process). A rank left
    without rows, when a batch is smaller than the world, runs one row that counts 0, to join the gradient sync."""
    size = -(-len(index) // world_size())
    share = index[rank() * size:(rank() + 1) * size]
    return (share, 1) if share else (index[:1], 0)


def rng_states():
    """Every rank's RNG states (dropout draws differ per rank), gathered on all ranks."""
    import torch.distributed as dist
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [mine]
    everyone_states = [None] * world_size()
    dist.all_gather_object(everyone_states, mine)
    return everyone_states


def for_all_ranks(model, device):
    """Under torchrun, the model wrapped so that gradients of its trainable parameters are averaged across ranks;
    the model itself in a single process."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)
