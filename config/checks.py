"""The checks a configuration's validation runs on the paths and models it names, before anything is downloaded or
built: a missing input, an output that would overwrite something else, a model of the wrong kind. Each failure is
one UsageError (exit 2) naming the flag and the value."""
import importlib.util
import os
from pathlib import Path

from model import load_config, looks_like_path
from textdata.readers import cola_missing
from training.checkpoints import ADAPTER_CONFIG, LM_TASK, adapter_base, adapter_task, folder_holds, is_adapter
from training.resume_state import resume_state_path
from utils import PLOTS_DIR, TUNING_DIR, UsageError, UserError, writable


def check_exists(flag, path, folder=False):
    """--flag PATH, when given, must name an existing folder (or file)."""
    if path and not (Path(path).is_dir() if folder else Path(path).is_file()):
        raise UsageError(f"--{flag} {path}: no such {'folder' if folder else 'file'}")


def check_variant(variant):
    if variant and looks_like_path(variant):  # else a Hugging Face id, looked up when it is loaded
        check_exists("gpt_variant", variant, folder=True)


def check_utf8_file(flag, path):
    check_exists(flag, path)
    if path:
        try:
            Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--{flag} {path}: not UTF-8 text (byte {e.start})") from None


def check_output_folder(flag, path):
    """A folder we write into: it may exist and hold other files, but must not be a file."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"--{flag} {path}: exists and is not a folder (nothing was written to it)")
    if not writable(path):
        raise UsageError(f"--{flag} {path}: cannot write there (a file is in the way, or no permission)")


def check_output_kind(flag, path, writes):
    """An output folder may hold an earlier model of the kind written there, never another model's files (a
    teacher's adapter, a base model), which the write would overwrite or mix with."""
    held = folder_holds(path)
    if held and held != writes:
        raise UsageError(f"--{flag} {path}: holds {held}; {writes} written there would overwrite or mix with it, "
                         "choose another folder")


def check_adapter_task(flag, folder, task):
    """--flag FOLDER, when given and an adapter, must be of PEFT's `task` type: gen decodes with a CAUSAL_LM
    adapter, predict classifies with a SEQ_CLS one."""
    if not folder:
        return
    check_exists(flag, folder, folder=True)
    if not is_adapter(folder) and task == LM_TASK:
        raise UsageError(f"--{flag} {folder}: no {ADAPTER_CONFIG}, not a LoRA adapter folder")
    if is_adapter(folder) and (adapter_task(folder) == LM_TASK) != (task == LM_TASK):
        if task == LM_TASK:
            raise UsageError(f"--{flag} {folder}: a classification adapter; gen decodes with a language-model "
                             f"(CAUSAL_LM) adapter (classify with `python run.py predict --model_path {folder}`)")
        raise UsageError(f"--{flag} {folder}: a language-model (CAUSAL_LM) adapter; predict classifies (decode with "
                         f"`python run.py gen --adapter {folder}`)")


def check_block_size(block_size, variant):
    if block_size and block_size > (context := load_config(variant).block_size):
        raise UsageError(f"--block_size {block_size}: over {variant}'s context of {context} tokens")


def check_results_writable():
    for folder in (TUNING_DIR, PLOTS_DIR):
        if Path(folder).exists() and not Path(folder).is_dir():
            raise UsageError(f"{folder}: a file is where run results go (the folder {folder}/); move it away")
        if not writable(folder):
            raise UsageError(f"{folder}/: cannot write run results there (permission denied)")


def check_tensorboard(folder):
    if folder and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if folder not in (None, "auto"):
        check_output_folder("tensorboard", folder)


def check_training_outputs(output_flag, out, writes, spec, tensorboard):
    """What every training run writes: its model folder (of the kind it writes), its resume state beside it, CoLA
    when it must be downloaded, TensorBoard's log, and its results."""
    check_output_folder(output_flag, out)
    if spec.is_cola and cola_missing(spec.data_dir):  # a read-only folder holding the files is fine
        check_output_folder("data_dir", spec.data_dir)
    state = resume_state_path(out)  # beside the output folder, not in it
    if not writable(state):
        raise UsageError(f"--{output_flag} {out}: cannot write {state} (a run's state between epochs) there")
    check_output_kind(output_flag, out, writes)
    check_data_spec(spec)
    check_tensorboard(tensorboard)
    check_results_writable()


def check_data_spec(spec):
    wrong = spec.ignored_flag()
    if wrong:
        raise UsageError(wrong)


def check_generator(adapter, variant):
    """--transfer_gen samples from the teacher's base: it must be loadable with its pretrained weights."""
    try:
        _, info, base = adapter_base(adapter, variant)
    except UserError:  # a broken adapter: distil itself says what is wrong
        return
    why = None
    if info.get("random_init"):
        why = "has random weights (its LoRA run used --random_init), so its samples are no sentences"
    elif os.path.isdir(base) and not list(Path(base).glob("*.safetensors")):
        why = "holds no weights (*.safetensors)"
    elif looks_like_path(base) and not os.path.isdir(base):
        why = "is no such folder"
    elif not os.path.isdir(base) and os.environ.get("HF_HUB_OFFLINE") and not hub_cached(base):
        why = "is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    if why:
        raise UsageError(f"--transfer_gen: the teacher's base {base} cannot be loaded to sample from: it {why}")


def hub_cached(name):
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


# The pip package of each database driver SQLAlchemy imports (PostgreSQL's default, psycopg 3, from SQLAlchemy 2.1).
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL"}


def shown_storage(url):
    """A database URL as it is printed: its password hidden (text SQLAlchemy cannot read holds none it could hide)."""
    from sqlalchemy.engine import make_url  # Optuna's database layer
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def check_storage(url):
    """--storage URL, a database: SQLAlchemy must know its kind and have its driver. Whether the server answers is
    known when the study is opened."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError
    try:
        make_url(url).get_dialect().import_dbapi()
    except NoSuchModuleError:  # an ArgumentError too
        raise UsageError(f"--storage {shown_storage(url)}: SQLAlchemy knows no database {url.split(':')[0]!r}") \
            from None
    except ArgumentError:
        raise UsageError(f"--storage {url}: not a database URL (e.g. postgresql://user:password@host/database)") \
            from None
    except ImportError as e:
        package = DRIVERS.get(e.name, e.name)
        raise UsageError(f"--storage {shown_storage(url)}: needs its driver, the Python module {e.name}: pip install "
                         f"'{package}'") from None
