"""One configuration per subcommand, composing the sections it uses (config.sections, textdata.readers.DataSpec).

A subcommand's default for a section is a section instance (LoRA trains 10 epochs, the students 5); LEFT_OUT names
the fields of its sections that are no flags of it (their values stay the default instance's). A default that
follows another flag is filled in as the configuration is made (__post_init__); `validate` runs every check of the
flags against each other and against the files they name, before anything is built or downloaded. Nothing changes
a configuration once it is made: `dataclasses.replace` makes variants."""
from dataclasses import dataclass, fields, replace
import importlib.util
import os
from pathlib import Path
from typing import ClassVar

from config.checks import (check_adapter_task, check_block_size, check_data_spec, check_exists, check_generator,
                           check_output_folder, check_output_kind, check_results_writable, check_storage,
                           check_training_outputs, check_utf8_file, check_variant)
from config.fields import flag, flat_values
from config.sections import (KD_TEMPERATURE, DecodeSettings, DistilSettings, LMSettings, LoRASettings, ModelSource,
                             PairColumns, RunOptions, StudentSettings, TrainSettings, TransferSettings)
from model import variant_slug
from textdata.lm_examples import text_files
from textdata.readers import DataSpec
from training.checkpoints import LM_TASK, folder_holds, is_adapter
from utils import UsageError, positive_int, seed_int

GEN_PROMPT = "Hello, I'm a language model,"
LM_BATCH_SIZE, LM_LR = 8, 2e-4  # LoRA --task lm: the LoRA paper's batch for E2E, and a rate that keeps it stable
BATCH_SIZE, LR = 128, 1e-3
TRAINING_ONLY = ("resume", "tensorboard")  # RunOptions a training run has and nothing else


def fill(obj, **defaults):
    """Set each attribute of `obj` named in `defaults` that is None to its default (a frozen dataclass, while it is
    being made)."""
    for name, value in defaults.items():
        if getattr(obj, name) is None:
            object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class GenConfig:
    """`run.py gen`: decode from a prompt, or (--dataset) every prompt of an evaluation split."""
    MODE: ClassVar[str] = "gen"
    LEFT_OUT: ClassVar[tuple] = (*TRAINING_ONLY, "data_dir", "text_column", "label_column", "train_split",
                                 "test_split")
    run: RunOptions = RunOptions()
    model: ModelSource = ModelSource()
    decode: DecodeSettings = DecodeSettings()
    data: DataSpec = DataSpec(dataset=None)
    pairs: PairColumns = PairColumns()
    prompt: str = flag(None, f"text to continue (default: {GEN_PROMPT!r})", exclusive="prompt")
    prompt_file: str = flag(None, "read the prompt from this file", exclusive="prompt")
    adapter: str = flag(None, "decode with this LoRA adapter (PEFT's CAUSAL_LM format) merged into its base",
                        metavar="FOLDER")
    num_samples: int = flag(1, "samples to draw, in one batch (seeds --seed, --seed+1, ...); sample 1 streams, the "
                            "rest print at the end", type=positive_int)
    no_stream: bool = flag(False, "print each sample when it is complete", switch=True)
    no_record: bool = flag(False, "do not append this run (configuration, prompt, samples, tokens/s) to "
                           "tuning/gen.jsonl", switch=True, decides=False)

    def __post_init__(self):
        if self.model.gpt_variant is None and not self.adapter:  # with an adapter: the base it names
            object.__setattr__(self, "model", replace(self.model, gpt_variant="gpt2"))
        if not (self.prompt_file or self.data.dataset):
            fill(self, prompt=GEN_PROMPT)

    def validate(self):
        self.decode.validate(self.num_samples)
        eager_only = [f for f, off in (("num_beams", 1), ("no_repeat_ngram_size", 0)) if getattr(self.decode, f) > off]
        if self.run.compile and eager_only:
            raise UsageError(f"--compile compiles the sampling step, which has no --{eager_only[0]}: drop one of the "
                             "two")
        check_variant(self.model.gpt_variant)
        check_adapter_task("adapter", self.adapter, LM_TASK)
        if self.adapter and self.model.random_init:
            raise UsageError("--adapter builds its base as the adapter's run recorded it: --random_init would be "
                             "ignored")
        self.validate_dataset()
        check_utf8_file("prompt_file", self.prompt_file)
        if not self.no_record:
            check_results_writable()

    def validate_dataset(self):
        """--dataset decodes the split's prompts, one output each, scored against prompt -> completion pairs."""
        values = flat_values(self)
        data_only = [f for f in ("dataset_config", "eval_split", "prompt_column", "completion_column")
                     if values[f] is not None]
        if not self.data.dataset:
            if data_only:
                raise UsageError(f"--{data_only[0]} is for --dataset (generation as evaluation): give --dataset too")
            return
        pair = [f for f in ("prompt_column", "completion_column") if values[f] is None]
        if pair:
            raise UsageError(f"--dataset decodes prompt -> completion pairs: give --{pair[0]} too")
        ignored = [f for f, off in (("prompt", None), ("prompt_file", None), ("num_samples", 1), ("compile", False),
                                    ("no_stream", False), ("no_record", False)) if values[f] != off]
        if ignored:
            raise UsageError(f"--dataset decodes every prompt of its evaluation split, one output each: --{ignored[0]} "
                             "would be ignored")
        check_data_spec(self.data)


METHOD_WRITES = {"lora": "a LoRA adapter", "head": "a trained head", "full": "a transformers model"}
LM_ONLY, CLASSIFY_ONLY = ("block_size", "prompt_column", "completion_column", "generate_eval"), ("label_column",)


@dataclass(frozen=True)
class LoRAConfig:
    """`run.py LoRA`: LoRA on a classifier (--task classify) or on GPT-2's own head (--task lm)."""
    MODE: ClassVar[str] = "LoRA"
    LEFT_OUT: ClassVar[tuple] = ("quantize", "clip")
    run: RunOptions = RunOptions()
    model: ModelSource = ModelSource()
    lora: LoRASettings = LoRASettings()
    train: TrainSettings = TrainSettings(epochs=10)
    data: DataSpec = DataSpec()
    lm: LMSettings = LMSettings()
    pairs: PairColumns = PairColumns()
    model_path: str = flag(None, "folder to write: the adapter, head or model (default models/LoRA-<variant>, "
                           "--method head or full models/head-<variant> or models/full-<variant>; with --task lm, "
                           "-lm after it)")

    def __post_init__(self):
        if self.model.gpt_variant is None:
            object.__setattr__(self, "model", replace(self.model, gpt_variant="gpt2"))
        lm = self.lora.task == "lm"
        if self.lora.lora_alpha is None:  # scale 1
            object.__setattr__(self, "lora", replace(self.lora, lora_alpha=self.lora.LoRA_rank))
        method = "LoRA" if self.lora.method == "lora" else self.lora.method
        fill(self, model_path=f"models/{method}-{variant_slug(self.model.gpt_variant)}" + ("-lm" if lm else ""))
        object.__setattr__(self, "train", self.train.with_defaults(batch_size=LM_BATCH_SIZE if lm else BATCH_SIZE,
                                                                   lr=LM_LR if lm else LR))

    def validate(self):
        self.lora.validate()
        check_variant(self.model.gpt_variant)
        self.validate_task()
        if self.lora.method == "full" and Path(self.model_path).resolve() == Path(self.model.gpt_variant).resolve():
            raise UsageError(f"--model_path {self.model_path}: is the base model, which --method full would "
                             "overwrite; choose another folder")
        check_training_outputs("model_path", self.model_path, METHOD_WRITES[self.lora.method], self.data,
                               self.run.tensorboard)

    def validate_task(self):
        """Each task's own flags; a language model reads text from --dataset (CoLA is labelled sentences), pairs
        need both columns, and a block fits in the model's context."""
        lm, values = self.lora.task == "lm", flat_values(self)
        given = next((f for f in (CLASSIFY_ONLY if lm else LM_ONLY) if values[f] not in (None, 0)), None)
        if given:
            needs = "--task classify (labels)" if lm else "--task lm"
            raise UsageError(f"--{given} is for {needs}: it does not apply to --task {self.lora.task}")
        if not lm:
            return
        if self.data.is_cola and self.train.epochs:
            raise UsageError("--task lm trains on text: give --dataset (a .txt file or folder, a folder of data "
                             "files, or a hub id) with a text column, or --prompt_column and --completion_column")
        if bool(self.pairs.prompt_column) != bool(self.pairs.completion_column):
            raise UsageError(f"--{'prompt' if self.pairs.completion_column else 'completion'}_column is needed too: "
                             "pairs have a prompt and a completion")
        self.validate_lm_source()
        if self.lm.generate_eval and not self.pairs.prompt_column:
            raise UsageError("--generate_eval decodes prompts: it needs prompt -> completion pairs (--prompt_column "
                             "and --completion_column)")
        check_block_size(self.lm.block_size, self.model.gpt_variant)

    def validate_lm_source(self):
        """Pairs are read from their two columns, .txt files whole: the flags that pick a column, a split or a
        configuration apply to neither."""
        if self.pairs.prompt_column:
            source, unused = "prompt -> completion pairs", ("text_column",)
        elif text_files(self.data):
            source = f"the text file(s) {self.data.dataset}"
            unused = ("text_column", "dataset_config", "train_split", "eval_split", "test_split")
        else:
            return
        given = next((f for f in unused if getattr(self.data, f) != getattr(DataSpec(), f)), None)
        if given:
            raise UsageError(f"--{given} {getattr(self.data, given)}: --task lm trains on {source}; it would be "
                             "ignored")


STUDENT_TRAINING = TrainSettings(epochs=5, clip=1.0)


@dataclass(frozen=True)
class RNNConfig:
    """`run.py rnn`: the DistilRNN student trained on labels alone."""
    MODE: ClassVar[str] = "rnn"
    LEFT_OUT: ClassVar[tuple] = ("grad_checkpoint",)
    run: RunOptions = RunOptions()
    train: TrainSettings = STUDENT_TRAINING
    data: DataSpec = DataSpec()
    student: StudentSettings = StudentSettings()
    model_path: str = flag("models/rnn", "student checkpoint folder to write")

    def __post_init__(self):
        object.__setattr__(self, "train", self.train.with_defaults(batch_size=BATCH_SIZE, lr=LR))

    def validate(self):
        check_training_outputs("model_path", self.model_path, "a student checkpoint", self.data, self.run.tensorboard)


@dataclass(frozen=True)
class DistilConfig:
    """`run.py distil`: the student taught by a LoRA-tuned GPT-2's logits."""
    MODE: ClassVar[str] = "distil"
    LEFT_OUT: ClassVar[tuple] = ("random_init", "quantize", "grad_checkpoint")
    run: RunOptions = RunOptions()
    train: TrainSettings = STUDENT_TRAINING
    data: DataSpec = DataSpec()
    student: StudentSettings = StudentSettings()
    distil: DistilSettings = DistilSettings()
    transfer: TransferSettings = TransferSettings()
    model: ModelSource = ModelSource()
    model_path: str = flag(None, "the teacher's adapter folder (default models/LoRA-<variant>)")
    student_path: str = flag("models/distil-rnn", "student checkpoint folder to write")

    def __post_init__(self):
        fill(self, model_path=f"models/LoRA-{variant_slug(self.model.gpt_variant or 'gpt2')}")
        object.__setattr__(self, "train", self.train.with_defaults(batch_size=BATCH_SIZE, lr=LR))
        if self.distil.kd_loss == "kl" and self.distil.temperature is None:  # each default where it applies
            object.__setattr__(self, "distil", replace(self.distil, temperature=KD_TEMPERATURE))
        if self.transfer.augment:
            object.__setattr__(self, "transfer", self.transfer.with_rates())

    def validate(self):
        self.distil.validate()
        self.transfer.validate()
        check_variant(self.model.gpt_variant)
        check_training_outputs("student_path", self.student_path, "a student checkpoint", self.data,
                               self.run.tensorboard)
        if self.transfer.transfer_gen and is_adapter(self.model_path):
            check_generator(self.model_path, self.model.gpt_variant)


@dataclass(frozen=True)
class PredictConfig:
    """`run.py predict`: classify sentences with a trained adapter or student."""
    MODE: ClassVar[str] = "predict"
    LEFT_OUT: ClassVar[tuple] = ("seed", *TRAINING_ONLY, "random_init", "data_dir")
    run: RunOptions = RunOptions()
    model: ModelSource = ModelSource()
    data: DataSpec = DataSpec()
    model_path: str = flag(None, "a LoRA adapter folder or a student checkpoint", required=True)
    sentence: tuple = flag(None, "a sentence to classify (repeatable)", append=True, exclusive="source")
    input: str = flag(None, "one sentence per line, a CoLA-format TSV, or a csv / tsv / json / jsonl / parquet file "
                      "read with --text_column, --label_column (with labels, the scores too)", exclusive="source")
    format: str = flag("table", "output format", choices=["table", "jsonl", "tsv"])
    batch_size: int = flag(128, "sentences per forward pass", type=positive_int)

    def validate(self):
        self.validate_source()
        check_variant(self.model.gpt_variant)
        check_exists("input", self.input)
        check_exists("model_path", self.model_path, folder=True)
        check_adapter_task("model_path", self.model_path, "SEQ_CLS")
        gpt_only = [f for f in ("gpt_variant", "quantize") if getattr(self.model, f)]
        if gpt_only and folder_holds(self.model_path) == "a student checkpoint":  # as predict reads it
            raise UsageError(f"--{gpt_only[0]} {getattr(self.model, gpt_only[0])}: --model_path {self.model_path} "
                             "holds an RNN student, not a GPT-2 classifier: it would be ignored")

    def validate_source(self):
        """--sentence reads no file and no dataset, --input no dataset: the flags that say how to read them apply
        to none."""
        data_flags = [f.name for f in fields(DataSpec) if f.name != "data_dir"]
        unused = data_flags if self.sentence else [f for f in data_flags if f not in ("text_column", "label_column")]
        values = flat_values(self)
        given = next((f for f in unused if values[f] != getattr(DataSpec(), f)), None)
        if (self.sentence or self.input) and given:
            source = "--sentence classifies the sentences given" if self.sentence else "--input classifies its file"
            raise UsageError(f"--{given} {values[given]}: {source}, it would be ignored")


@dataclass(frozen=True)
class ExportConfig:
    """`run.py export`: an adapter folded into its base, written as a plain Hugging Face checkpoint (on the CPU, in
    fp32: no device or dtype flags)."""
    MODE: ClassVar[str] = "export"
    LEFT_OUT: ClassVar[tuple] = ("device", "dtype", "compile", "seed", *TRAINING_ONLY, "random_init", "quantize")
    run: RunOptions = RunOptions(device="cpu", dtype="float32")
    model: ModelSource = ModelSource()
    model_path: str = flag(None, "the adapter folder", required=True)
    out: str = flag(None, "folder to write (config.json + model.safetensors)", required=True)

    def validate(self):
        check_variant(self.model.gpt_variant)
        check_exists("model_path", self.model_path, folder=True)
        check_output_folder("out", self.out)
        check_output_kind("out", self.out, "a transformers model")


@dataclass(frozen=True)
class InfoConfig:
    """`run.py info`: versions, hardware and what each subcommand would run on here."""
    MODE: ClassVar[str] = "info"
    LEFT_OUT: ClassVar[tuple] = ("dtype", "compile", "seed", *TRAINING_ONLY)
    run: RunOptions = RunOptions()

    def validate(self):
        pass


@dataclass(frozen=True)
class ReportConfig:
    """`run.py report`: the runs' records and plots as report/report.md and one self-contained report.html."""
    MODE: ClassVar[str] = "report"
    LEFT_OUT: ClassVar[tuple] = ("device", "dtype", "compile", "seed", *TRAINING_ONLY)
    run: RunOptions = RunOptions(device="cpu", dtype="float32")
    runs: str = flag(".", "the folder the runs were started in, whose tuning/ and plots/ the report reads",
                     metavar="DIR")
    out: str = flag("report", "folder to write report.md and report.html to (other files there are left alone)",
                    metavar="DIR")
    select: str = flag("latest", "which finished run of each mode, variant, task and dataset is shown: the latest, "
                       "or the best by dev score", choices=["latest", "best"])
    run_id: tuple = flag(None, "show this run (its id as the report lists it) for its mode, variant, task and "
                         "dataset (repeatable)", names=["--run"], append=True, metavar="ID")

    def validate(self):
        check_exists("runs", self.runs, folder=True)
        check_output_folder("out", self.out)


TUNABLE = ("LoRA", "rnn", "distil")
SEARCH_DEFAULTS = {"trials": 20, "sampler": "tpe", "pruner": "median"}  # the metric follows the runs: see cli


@dataclass(frozen=True)
class TuneConfig:
    """`run.py tune`: a sweep of seeds x a grid of another subcommand's flags, or an Optuna search of them; the
    flags it does not know go to every run."""
    MODE: ClassVar[str] = "tune"
    LEFT_OUT: ClassVar[tuple] = ("device", "dtype", "compile", "seed", *TRAINING_ONLY)
    target: str = flag(None, "the subcommand to sweep", choices=TUNABLE, positional=True)
    run: RunOptions = RunOptions()
    seeds: tuple = flag([0, 1, 2], "each configuration runs once per seed", nargs="+", type=seed_int)
    grid: tuple = flag([], "values to sweep, per flag", nargs="+", metavar="FLAG=V1,V2")
    name: str = flag(None, "names tuning/<name>.md and plots/tune_<name>.png, and the study (default: from the grid "
                     "or the space)")
    parallel: int = flag(1, "run this many configurations (grid) or workers (optuna) side by side, one process each "
                         "(each on a visible GPU if any)", type=positive_int)
    search: str = flag("grid", "grid: every configuration of --grid; optuna: --trials configurations drawn from "
                       "--space, in a study workers share", choices=["grid", "optuna"])
    space: tuple = flag([], "--search optuna: each flag's range, log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or "
                        "cat:A,B,...", nargs="+", metavar="FLAG=KIND:...")
    trials: int = flag(None, "--search optuna: finished (complete or pruned) trials the study is to reach, over all "
                       f"its workers (default: {SEARCH_DEFAULTS['trials']})", type=positive_int)
    sampler: str = flag(None, "--search optuna: how trials are drawn; trial k's sampler is seeded with k (default: "
                        "tpe)", choices=["tpe", "random"])
    pruner: str = flag(None, "--search optuna: median stops a trial whose dev metric after an epoch is below the "
                       "median of earlier trials' there (default: median)", choices=["median", "none"])
    metric: str = flag(None, "--search optuna: the mean dev metric a trial is scored by; perplexity is minimized "
                       "(default: acc; LoRA --task lm: perplexity)", choices=["acc", "mcc", "perplexity"])
    storage: str = flag(None, "--search optuna: the study's database URL (sqlite:///..., postgresql://..., "
                        "mysql://...) or a journal file on a shared filesystem (default: sqlite:///tuning/<name>.db)",
                        metavar="URL")
    restart: bool = flag(False, "start the runs an earlier sweep left interrupted over, instead of resuming them from "
                         "their saved state", switch=True)

    def __post_init__(self):
        if self.search == "optuna":
            fill(self, **SEARCH_DEFAULTS)

    def validate(self):
        """--grid belongs to the grid, --space and the study's flags to --search optuna (which needs the optuna
        package)."""
        check_results_writable()
        if self.search == "grid":
            given = next((f for f in ("space", "storage", *SEARCH_DEFAULTS, "metric") if getattr(self, f)), None)
            if given:
                raise UsageError(f"--{given} is for --search optuna (the grid runs every configuration of --grid)")
            return
        if importlib.util.find_spec("optuna") is None:
            raise UsageError("--search optuna needs the optuna package: pip install optuna")
        if self.grid:
            raise UsageError("--grid is for --search grid; --search optuna draws configurations from --space")
        if not self.space:
            raise UsageError("--search optuna needs --space, e.g. --space lr=log:1e-4:3e-3")
        if self.storage and "://" in self.storage:
            check_storage(self.storage)
        if os.environ.get("WORLD_SIZE", "1") != "1":
            raise UsageError("--search optuna runs its trials one process each: start workers side by side "
                             "(--parallel) or as separate jobs, not under torchrun")


SUBCOMMANDS = {c.MODE: c for c in (GenConfig, LoRAConfig, RNNConfig, DistilConfig, PredictConfig, ExportConfig,
                                   InfoConfig, TuneConfig, ReportConfig)}
