"""What every file needs: the errors users can fix, where results go, signals, seeding, atomic files, JSON reading,
argparse number types."""
import argparse
import contextlib
import hashlib
import json
import math
import os
from pathlib import Path
import random
import re
import signal
import stat
import tempfile
import threading

import numpy as np
import torch


class UserError(Exception):
    """A failure the user can fix; run.py prints its message as one line and exits 1."""


class UsageError(UserError):
    """A command line that cannot run as given, found before anything is built or downloaded: exit 2."""
    exit_code = 2


TUNING_DIR = "tuning"  # run records, relative to where a run is started
PLOTS_DIR = "plots"  # a run's plots, likewise


class Terminated(KeyboardInterrupt):
    """SIGTERM, which SLURM, Kubernetes, `timeout` and systemd send before killing: raised like Ctrl-C's
    KeyboardInterrupt, so that a run stops the same way (resume state kept, one line), with exit code 143."""
    exit_code = 143


def interrupt_exit_code(interrupt):
    return getattr(interrupt, "exit_code", 130)  # 128 + SIGINT


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated; a second SIGTERM then ends the process at once."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def current_umask():
    """The process's umask (Python has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mode_for(path):
    """The mode a plain open(path, "w") would leave: an existing file keeps its own, a new one gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


# .<name>.<process id>-<random>.tmp: our temporary files, which say which process writes them
TEMP_NAME = re.compile(r"\..+\.(\d+)-[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder):
    """Remove the temporary files in `folder` that a process of ours, killed while writing (SIGKILL, a power cut),
    left behind: those named by TEMP_NAME whose process is gone. Files of running processes and the user's own
    stay."""
    for entry in os.scandir(folder):
        found = TEMP_NAME.fullmatch(entry.name)
        if found and entry.is_file(follow_symlinks=False) and not process_alive(int(found.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a process id at all
        return True
    return True


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes. The result has the
    mode open() would give it (mkstemp makes its files private, 0o600). A symbolic link is written through: its
    target is replaced, and the link stays. Stale temporaries of ours in the folder go first."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode_for(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_files(folder, names):
    """Yield {name: temporary path} inside `folder` (created if missing). Once the block finishes, every file is
    complete, and only then does each temporary replace its name; if the block fails, the previous files stay as
    they were. Nothing else in the folder is touched: it may hold the user's own files."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(atomic_path(Path(folder) / name)) for name in names}


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def writable(path):
    """True if `path` can be created or replaced: its nearest existing ancestor is a writable folder (or it is
    itself an existing writable file)."""
    path = Path(path).absolute()
    first = path
    while not path.exists():
        path = path.parent
    if path.is_dir():
        return os.access(path, os.W_OK)
    return path == first and os.access(path.parent, os.W_OK)


def file_sha256(*paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt {what} ({e})") from None


def safe_name(text, most=100):
    """`text` with every character other than letters, digits, '.', '_' and '-' made '_'; past `most` characters
    cut, and ended with a hash of the whole, so that it stays a valid file name and tells texts apart."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
    return name if len(name) <= most else f"{name[:most - 17]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # what the models compute in: a larger value is inf there


def number_in(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high], each end optionally open. A missing end is
    infinity, itself outside: inf, NaN and numbers float32 cannot hold are refused, since a run given them trains
    to NaN weights."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise argparse.ArgumentTypeError(f"must be a finite number (float32's largest is {FLOAT32_MAX:.3g}), "
                                             f"got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            left = "(" if low_open or low is None else "["
            right = ")" if high_open or high is None else "]"
            bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse


positive_int = number_in(int, 1)


non_negative_int = number_in(int, 0)


positive_float = number_in(float, 0, low_open=True)


non_negative_float = number_in(float, 0)


fraction = number_in(float, 0, 1)


seed_int = number_in(int, 0, 2 ** 32 - 1)
