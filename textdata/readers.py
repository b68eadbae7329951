"""The text a run reads: the GPT-2 tokenizer, CoLA (read, downloaded when missing), any dataset `datasets` can
load, and the sentences `predict` is given."""
import contextlib
import csv
from dataclasses import dataclass, field, fields
import io
import os
from pathlib import Path
import sys
import urllib.request
import zipfile

from tqdm import tqdm

from config.fields import flag
from model import LABELS
from utils import UserError, atomic_path, safe_name

COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"


COLA_SPLITS = {"train": "in_domain_train.tsv", "dev": "in_domain_dev.tsv", "ood": "out_of_domain_dev.tsv"}


def get_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once "
                        "and needs internet for that, or TIKTOKEN_CACHE_DIR pointing at a folder holding it") from e


def encode(tokenizer, sentences):
    return [tokenizer.encode_ordinary(s) for s in sentences]


def default_cola_dir():
    return os.environ.get("COLA_DATA_DIR", "data/cola")


def download(url, dest):
    """Download `url` to `dest` atomically with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); download it by hand or point --data_dir at a folder "
                        f"holding {', '.join(COLA_SPLITS.values())}") from e


def cola_missing(data_dir):
    """True if `data_dir` lacks one of the three CoLA files, which a run then downloads into it."""
    return not all((Path(data_dir) / name).exists() for name in COLA_SPLITS.values())


def ensure_cola(data_dir):
    """Make sure the three raw CoLA TSVs are in `data_dir`, downloading the public release when they are not.
    Folders made for the download are removed again if it fails (only if still empty)."""
    data_dir = Path(data_dir)
    if not cola_missing(data_dir):
        return data_dir
    made = [p for p in [data_dir, *data_dir.parents] if not p.exists()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_dir {data_dir}: cannot create it ({e.strerror})") from None
    zip_path = data_dir / "cola_public_1.1.zip"
    try:
        download(COLA_URL, zip_path)
    except BaseException:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    with zipfile.ZipFile(zip_path) as z:
        for name in COLA_SPLITS.values():
            with atomic_path(data_dir / name) as tmp, open(tmp, "wb") as f:
                f.write(z.read(f"cola_public/raw/{name}"))
    zip_path.unlink()
    return data_dir


def read_cola_tsv(path):
    """Read one raw CoLA file (source, label, original mark, sentence) into (sentences, labels).

    Sentences hold quotes, so fields are split on tabs only (QUOTE_NONE), never CSV-unquoted.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    sentences, labels = [], []
    rows = csv.reader(io.StringIO(text, newline=None), delimiter="\t", quoting=csv.QUOTE_NONE)
    for line_no, row in enumerate(rows, start=1):
        if not row or row == [""]:
            continue
        if len(row) != 4:
            raise UserError(f"{path}:{line_no}: expected 4 tab-separated columns, found {len(row)}")
        if row[1] not in ("0", "1"):
            raise UserError(f"{path}:{line_no}: label must be 0 or 1, found {row[1]!r}")
        if not row[3].strip():
            raise UserError(f"{path}:{line_no}: the sentence is empty")
        sentences.append(row[3])
        labels.append(int(row[1]))
    if not sentences:
        raise UserError(f"{path}: no rows")
    return sentences, labels


def load_cola(data_dir):
    """{'train'|'dev'|'ood': (sentences, labels)} from the raw release in `data_dir`."""
    data_dir = ensure_cola(data_dir)
    return {split: read_cola_tsv(data_dir / name) for split, name in COLA_SPLITS.items()}


DATA_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


TEXT_COLUMNS, LABEL_COLUMNS = ("sentence", "text"), ("label", "labels")


COLA_TITLES = {"dev": "in-domain dev", "ood": "out-of-domain"}


@dataclass(frozen=True)
class DataSpec:
    """Which data a run reads: `cola` (the raw TSVs in data_dir), a Hugging Face hub id, or a local folder; the
    columns and splits default to the usual names."""
    dataset: str = flag("cola", "cola (raw TSVs in --data_dir), a Hugging Face dataset id, or a folder: "
                        "train/validation[/test] csv, tsv, json, jsonl, parquet, or save_to_disk's (gen: the prompt -> "
                        "completion pairs whose evaluation split it decodes and scores, BLEU and ROUGE-L)")
    dataset_config: str = flag(None, "the hub dataset's configuration, e.g. sst2")
    data_dir: str = flag(None, "folder of the raw CoLA TSVs (downloaded there when missing; default $COLA_DATA_DIR "
                         "when set, else data/cola)")
    text_column: str = flag(None, "default: sentence, else text")
    label_column: str = flag(None, "default: label, else labels")
    train_split: str = flag("train", "the split trained on")
    eval_split: str = flag(None, "the evaluation split (default: validation, else dev)")
    test_split: str = flag(None, "the second evaluation, if labelled (default: test)")

    def __post_init__(self):
        if self.data_dir is None and self.dataset == "cola":
            object.__setattr__(self, "data_dir", default_cola_dir())

    @property
    def is_cola(self):
        return self.dataset == "cola"

    @property
    def name(self):
        """How reports name the dataset: 'CoLA', 'nyu-mll/glue (sst2)', a folder's path."""
        return "CoLA" if self.is_cola else self.dataset + (f" ({self.dataset_config})" if self.dataset_config else "")

    def ignored_flag(self):
        """What is wrong with a flag this dataset would ignore, or None: CoLA's files have fixed splits and columns,
        and only a dataset from the hub has configurations."""
        if self.is_cola:
            given = [f.name for f in fields(self) if f.name not in ("dataset", "data_dir")
                     and getattr(self, f.name) != f.default]
            if given:
                return (f"--{given[0]} {getattr(self, given[0])}: CoLA's files have fixed splits and columns (it "
                        "applies to a --dataset from the hub or a folder)")
        elif self.dataset_config and Path(self.dataset).is_dir():
            return (f"--dataset_config {self.dataset_config}: a local folder has no configurations (only a dataset "
                    "from the hub has)")
        return None

    @property
    def slug(self):
        """How file names carry the dataset: 'cola', 'nyu-mll_glue-sst2', a local folder's own name."""
        base = Path(self.dataset).name if Path(self.dataset).is_dir() else self.dataset
        return safe_name(base + (f"-{self.dataset_config}" if self.dataset_config else ""))


def run_stem(mode, spec):
    """The name of a run's log and plots: the mode alone for CoLA, the mode and the dataset otherwise."""
    return mode if spec.is_cola else f"{mode}-{spec.slug}"


@dataclass
class TextData:
    """Sentences and label ids per split ({'train', 'dev'[, 'ood']}), the label names, what each evaluation split
    is called in reports, and notes for the summary (rows left out, a missing second evaluation)."""
    splits: dict
    labels: tuple
    titles: dict
    notes: list = field(default_factory=list)


def local_data_files(folder):
    """{split: [file]} of a folder of train.*, validation.* (or dev.*), test.* ... files, and their suffix."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in DATA_FILE_TYPES:
            files.setdefault(path.stem, []).append(str(path))
    suffixes = {Path(f).suffix for paths in files.values() for f in paths}
    if len(suffixes) != 1:
        found = "no" if not suffixes else "mixed (" + ", ".join(sorted(suffixes)) + ")"
        raise UserError(f"--dataset {folder}: {found} data files; expected train.*, validation.* (or dev.*) and "
                        "optionally test.*, all csv, tsv, json, jsonl or parquet, or a DatasetDict.save_to_disk folder")
    return files, suffixes.pop()


def load_dataset_dict(spec):
    """{split: Dataset} of what `spec` names: a save_to_disk folder, a folder of data files (each split read from
    its own files, so a test file may lack the label column), or a hub dataset (cached by `datasets`)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its errors reach us as exceptions
    path = Path(spec.dataset)
    try:
        if (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            files, suffix = local_data_files(path)
            return {split: read_data_files(paths, suffix) for split, paths in files.items()}
        return datasets.load_dataset(spec.dataset, spec.dataset_config)
    except UserError:
        raise
    except Exception as e:  # offline, no such dataset or config, unreadable files: datasets raises many kinds
        raise UserError(f"could not load dataset {spec.name!r} ({error_reason(e)})") from None


def read_data_files(paths, suffix):
    """One split's data files as a Dataset, refusing a file without rows by name."""
    import datasets
    extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        return datasets.load_dataset(DATA_FILE_TYPES[suffix], data_files=paths, split="train", **extra)
    except Exception as e:
        empty = next((p for p in paths if no_rows(p)), None)
        if empty:
            raise UserError(f"{empty}: no rows (a header at most)") from None
        raise UserError(f"{', '.join(paths)}: cannot read it ({error_reason(e)})") from None


def no_rows(path):
    """True if a csv / tsv file holds a header at most, or a json / jsonl file nothing but blank lines."""
    if Path(path).suffix == ".parquet":
        return False
    try:
        lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        return False
    return len(lines) <= (1 if Path(path).suffix in (".csv", ".tsv") else 0)


def error_reason(e):
    """What `datasets` (or pyarrow) says went wrong: the last non-empty line of the innermost cause, where the
    outer exceptions only say that something did ("An error occurred while generating the dataset")."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def pick(options, wanted, defaults, what, flag):
    """`wanted` if it is among `options`, else the first of `defaults` that is (None if none is); an unknown
    `wanted`, or none of `defaults` when one is required (what='column'), is refused listing the options."""
    if wanted is not None and wanted not in options:
        raise UserError(f"--{flag} {wanted}: no such {what} (there are: {', '.join(options)})")
    found = wanted or next((d for d in defaults if d in options), None)
    if found is None and what == "column":
        raise UserError(f"no column {' or '.join(map(repr, defaults))}; pass --{flag} (there are: "
                        f"{', '.join(options)})")
    return found


def unlabelled(value):
    """No label: GLUE's test splits hold -1 (ClassLabel's 'missing'), files may leave the cell empty."""
    return value is None or value == -1 or value == ""


def label_text(value):
    """A label value as text. A numeric column with an empty cell is read as floats, so 1.0 is the label 1."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def label_names(feature, columns):
    """The dataset's label names: its ClassLabel's names when it has one, else the distinct values (as text, read
    by checked_labels), sorted, over every split read."""
    if hasattr(feature, "names"):
        return tuple(feature.names)
    values = sorted({v for values in columns for v in values if not unlabelled(v)},
                    key=lambda v: (isinstance(v, str), v))
    return tuple(dict.fromkeys(label_text(v) for v in values))  # numbers in order, then names; "1" and 1 are one


def checked_labels(values, where, column):
    """Check a label column that is not a ClassLabel before its values are sorted or counted: refuse a cell that is
    not one class (a list: multi-label data; a fraction or NaN: regression data, or a broken cell), and a column
    mixing numbers (or booleans) with names."""
    kinds = {}
    for row, v in enumerate(values):
        if unlabelled(v):
            continue
        one = isinstance(v, (str, int)) or (isinstance(v, float) and v.is_integer())  # int: bool too
        if not one:
            raise UserError(f"{where}, row {row}: the label ({column!r}) is {v!r}; a label is one class, a name or "
                            "an integer (multi-label and regression data are not supported)")
        kinds.setdefault("name" if isinstance(v, str) else "number", (row, v))
    if len(kinds) > 1:
        (row, v), (other, w) = kinds["name"], kinds["number"]
        raise UserError(f"{where}, row {row}: the label ({column!r}) is the name {v!r} but row {other} holds the "
                        f"number {w!r}; a label column holds names or numbers, not both")


def checked_texts(texts, where, column, role="text", error=UserError):
    """A column of text (a language model's: its prompts or completions, `role`), refusing the first cell that is
    empty or not a string with `error`."""
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            what = "empty" if text is None or isinstance(text, str) else f"not a string ({type(text).__name__})"
            raise error(f"{where}, row {row}: the {role} ({column!r}) is {what}")
    return list(texts)


def label_ids(values, feature, names):
    """Label ids into `names` (-1 where a row has no label)."""
    index = {name: i for i, name in enumerate(names)}
    if hasattr(feature, "names"):
        return [-1 if unlabelled(v) else int(v) for v in values]
    return [-1 if unlabelled(v) else index[label_text(v)] for v in values]


def split_names(spec, dd):
    """{'train', 'dev', 'ood'}: the name in `dd` of the split each role reads, by its flag or the usual names (None
    for a second evaluation split the dataset lacks); a dataset with no evaluation split is refused."""
    names = {"train": pick(list(dd), spec.train_split, (), "split", "train_split"),
             "dev": pick(list(dd), spec.eval_split, ("validation", "dev"), "split", "eval_split"),
             "ood": pick(list(dd), spec.test_split, ("test",), "split", "test_split")}
    if names["dev"] is None:
        raise UserError(f"{spec.name}: no validation or dev split; pass --eval_split (there are: {', '.join(dd)})")
    return names


def load_text_data(spec):
    """The splits a run trains and evaluates on: CoLA's three files, or the train / eval / test splits of any
    dataset, with label names. Rows without a label are left out (and said so); the test split is the second
    evaluation when it has labels."""
    if spec.is_cola:
        return TextData(load_cola(spec.data_dir or default_cola_dir()), LABELS, COLA_TITLES)
    dd = load_dataset_dict(spec)
    names = split_names(spec, dd)
    parts = {k: dd[v] for k, v in names.items() if v is not None}
    columns = list(parts["train"].column_names)
    text = pick(columns, spec.text_column, TEXT_COLUMNS, "column", "text_column")
    label = pick(columns, spec.label_column, LABEL_COLUMNS, "column", "label_column")
    feature = parts["train"].features[label]
    where = {key: split_where(spec, names[key]) for key in parts}
    for key, part in parts.items():
        for column, what in ((text, "text"), (label, "label")):
            if column not in part.column_names and not (key == "ood" and column == label):
                raise UserError(f"{where[key]}: no {what} column {column!r} (there are: "
                                f"{', '.join(part.column_names)})")
    labelled = {key: p[label] for key, p in parts.items() if label in p.column_names}
    if not hasattr(feature, "names"):
        for key, values in labelled.items():
            checked_labels(values, where[key], label)
    data = TextData({}, label_names(feature, labelled.values()), {k: names[k] for k in ("dev", "ood")})
    for key, part in parts.items():
        add_split(data, key, names[key], part, text, label, feature, where[key])
    check_classes(data, spec, names["train"], label)
    return data


def split_where(spec, split):
    """How errors name a split: its files in a local folder, else the dataset and the split's name."""
    path = Path(spec.dataset)
    if path.is_dir() and not (path / "dataset_dict.json").exists():
        return ", ".join(local_data_files(path)[0][split])
    return f"{spec.name}, split {split!r}"


def add_split(data, key, split, part, text, label, feature, where):
    """Put one split's labelled rows into `data`, noting those left out; an evaluation split with no labels at all
    (or no label column) is left out whole (the test split) or refused (the validation split)."""
    sentences = checked_texts(part[text], where, text)
    ids = label_ids(part[label], feature, data.labels) if label in part.column_names else [-1] * len(sentences)
    keep = [i for i, y in enumerate(ids) if y >= 0]
    if not keep and key == "ood":
        data.notes.append(f"the {split} split has no labels: no second evaluation")
        return
    if not keep:
        raise UserError(f"{where}: no row has a label in {label!r}")
    if len(keep) < len(ids):
        data.notes.append(f"{len(ids) - len(keep)} unlabelled rows of {split} left out")
    data.splits[key] = ([sentences[i] for i in keep], [ids[i] for i in keep])


def check_classes(data, spec, split, label):
    if len(data.labels) < 2 or len(set(data.splits["train"][1])) < 2:
        found = sorted({data.labels[y] for y in data.splits["train"][1]})
        raise UserError(f"{spec.name}, split {split!r}: the label column {label!r} has one class only "
                        f"({', '.join(map(repr, found))}); classification needs two or more")


def read_table_file(path, spec):
    """(sentences, label names or None) of a csv / tsv / json / jsonl / parquet file, read with the run's columns."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # its errors reach us as exceptions
    try:
        table = read_data_files([str(path)], path.suffix)
    except UserError as e:
        raise UserError(f"--input {e}") from None
    text = pick(table.column_names, spec.text_column, TEXT_COLUMNS, "column", "text_column")
    label = pick(table.column_names, spec.label_column, LABEL_COLUMNS, "label column", "label_column")
    sentences = checked_texts(table[text], f"--input {path}", text)
    if label is None:
        return sentences, None
    feature = table.features[label]
    if not hasattr(feature, "names"):
        checked_labels(table[label], f"--input {path}", label)
    names = [None if unlabelled(v) else feature.names[v] if hasattr(feature, "names") else label_text(v)
             for v in table[label]]
    return sentences, names


def read_sentences(sentences=None, input_path=None, spec=DataSpec()):
    """(sentences, label names or None) from a list, a file (plain lines, a CoLA TSV, or a data file with the
    run's columns), the evaluation split of a dataset other than CoLA, or standard input."""
    if sentences:
        return sentences, None
    if input_path:
        return read_input_file(Path(input_path), spec)
    if not spec.is_cola:
        data = load_text_data(spec)
        sentences, labels = data.splits["dev"]
        return sentences, [data.labels[y] for y in labels]
    return text_lines(sys.stdin.read()), None


def read_input_file(path, spec):
    """predict's --input, told apart by its suffix first: csv, json, jsonl and parquet are tables (parquet is not
    text at all); a .tsv is a CoLA file if its first row looks like one, else a table; anything else is plain
    lines."""
    if path.suffix in DATA_FILE_TYPES and path.suffix != ".tsv":
        return read_table_file(path, spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--input {path}: cannot read it ({e})") from None
    first = next((line for line in text_lines(text) if line.strip()), "").split("\t")
    if len(first) == 4 and first[1] in ("0", "1"):  # a CoLA-format TSV: source, label, original mark, sentence
        sentences, labels = read_cola_tsv(path)
        return sentences, [LABELS[y] for y in labels]
    if path.suffix == ".tsv":
        return read_table_file(path, spec)
    return text_lines(text), None


def text_lines(text):
    """The lines of a text file: split at line ends only (\n, \r\n, \r), not at the other characters that
    str.splitlines takes for line breaks (U+2028, form feed, ...), which can sit inside a sentence."""
    lines = io.StringIO(text, newline=None).read().split("\n")
    return lines[:-1] if lines[-1] == "" else lines
