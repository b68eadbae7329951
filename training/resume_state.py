"""The state a run leaves after each epoch, which --resume continues from: written atomically beside the model
folder, refused when the flags that decide the result or the data have changed since."""
from pathlib import Path

import torch

from config.fields import config_from_values, deciding_values
from runtime.distributed import broadcast_from_main, is_main, rank, world_size
from utils import UserError, atomic_path


def resume_state_path(out_path):
    return Path(f"{str(out_path).rstrip('/')}.resume.pt")


def trainable_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


START_OVER = "rerun without --resume to start over (in a sweep: with --restart)"


def save_run_state(path, run, model, optimizer, scaler, generator, config, rng, data):
    """Everything needed to continue after the last finished epoch, written atomically, with the fingerprint of
    each split it trained and evaluated on (`data`: batches.split_fingerprints)."""
    state = dict(run, model=trainable_state(model), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 generator=generator.get_state(), rng=rng, config=config, data=data)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_run_state(path, config, data, config_class):
    """A saved run, refusing one made with other flags or on other data (a changed split would mix epochs on
    two datasets in one run). `config` holds the values that decide the result (config.fields.deciding_values of a
    `config_class` configuration); the state's are read back as a configuration of that class, so that a state
    saved before a flag existed, or with another schema, compares by what its values mean."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"--resume: no saved run at {path}; start the run without --resume") from None
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated run state ({type(e).__name__})") from None
    saved = deciding_values(config_from_values(config_class, state["config"]), resuming=True)
    changed = [k for k in config if saved.get(k) != config[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{path}: saved with --{k} {saved.get(k)}, this run has --{k} {config[k]}; "
                        f"rerun with the same flags, or {START_OVER}")
    changed = [name for name in data if state.get("data", data).get(name) != data[name]]
    if changed:
        raise UserError(f"{path}: saved on other data: the {changed[0]!r} split has changed since (rows added, "
                        f"removed or relabelled); {START_OVER}")
    if len(state["rng"]) != world_size():
        raise UserError(f"{path}: saved by {len(state['rng'])} processes, resumed by {world_size()}")
    return state


def load_run_state(path, model, optimizer, scaler, generator, config, data, config_class):
    """Restore a run saved by save_run_state. Rank 0 reads the file and every rank gets its content (or the
    same error), so several machines need not share a disk."""
    state, error = None, None
    if is_main():
        try:
            state = read_run_state(path, config, data, config_class)
        except UserError as e:
            error = str(e)
    state, error = broadcast_from_main((state, error))
    if error:
        raise UserError(error)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # fp16 runs: the loss scale reached
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"][rank()]["cpu"])
    if state["rng"][rank()]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"][rank()]["cuda"])
    return {k: state[k] for k in ("run_id", "epoch", "history", "best_epoch", "best_score", "best_state", "best_dev")}
