"""Where a run's numbers come from, as its record keeps them: the command that reproduces it, the code's commit,
the library versions, the machine's platform."""
import functools
from importlib import metadata
from pathlib import Path
import platform
import shlex
import subprocess

from cli.parser import command_line

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "peft", "tiktoken", "huggingface_hub", "safetensors", "numpy")


def git(*args):
    """git's output in the code's folder, or None if it fails (no git, or no checkout there)."""
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


@functools.cache
def code_commit():
    """`git describe --always --dirty` of the code at run time, where its folder is a git checkout of its own (not
    a folder inside another repository), else None: a "-dirty" suffix says the numbers come from uncommitted
    changes."""
    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:
        return None
    return git("describe", "--always", "--dirty")


@functools.cache
def library_versions():
    """Python's and each library's version ({name: version}; a library not installed is left out)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def reproducing_command(config):
    """The shell command that runs `config` again: `python run.py` and the flags that differ from the defaults."""
    return shlex.join(["python", "run.py", *command_line(config)])


def provenance(config):
    """What a record holds of where its run comes from."""
    return {"command": reproducing_command(config), "commit": code_commit(), "versions": library_versions(),
            "platform": platform.platform()}
