"""What happens when a user types something wrong, or something goes wrong mid-run: one line on stderr, the
right exit code, nothing half-written. Every row of README's "What happens when…" table is a case here."""
import json
from pathlib import Path
import shutil
import signal
import time

import pytest
import torch

from conftest import (ROOT, assert_same_weights, in_epoch, run_cli, run_main, save_tiny_adapter, save_tiny_gpt2,
                      start_run)
from model import DistilRNN, RNNConfig
import run
from training.checkpoints import save_student

# (what the user did, the command after `python run.py`, exit code, the start of the stderr line)
CASES = [
    ("no subcommand", "", 2, "error: the following arguments are required: mode"),
    ("zero new tokens", "gen --max_new_tokens 0", 2, "error: argument --max_new_tokens: must be in [1, inf), got 0"),
    ("negative temperature", "gen --temperature -1", 2, "error: argument --temperature: must be in [0, inf), got -1"),
    ("top-p of 0", "gen --top_p 0", 2, "error: argument --top_p: must be in (0, 1], got 0"),
    ("top-p above 1", "gen --top_p 1.5", 2, "error: argument --top_p: must be in (0, 1], got 1.5"),
    ("top-k of 0", "gen --top_k 0", 2, "error: argument --top_k: must be in [1, inf), got 0"),
    ("not a number", "gen --top_k ten", 2, "error: argument --top_k: not an integer: 'ten'"),
    ("unknown dtype", "gen --dtype float8", 2, "error: argument --dtype: invalid choice: 'float8'"),
    ("missing prompt file", "gen --prompt_file nope.txt", 2, "error: --prompt_file nope.txt: no such file"),
    ("missing model folder", "gen --gpt_variant ./no/such/folder", 2,
     "error: --gpt_variant ./no/such/folder: no such folder"),
    ("a model with fewer tokens than the tokenizer", "gen --gpt_variant small-vocab --prompt Hi", 1,
     "error: small-vocab/config.json: a vocabulary of 300 tokens, fewer than GPT-2's tokenizer has (50257)"),
    ("a GPT-2 variant this model does not compute", "gen --gpt_variant relu-gpt2 --prompt Hi", 1,
     "error: relu-gpt2/config.json: activation_function 'relu' is a GPT-2 variant this model does not compute "
     "(it computes 'gelu_new')"),
    ("a prompt file that is not UTF-8", "gen --prompt_file latin1.txt", 2,
     "error: --prompt_file latin1.txt: not UTF-8 text (byte 3)"),
    ("a LoRA target given twice", "LoRA --lora_targets attn.c_attn attn.c_attn", 2,
     "error: --lora_targets: attn.c_attn is given twice"),
    ("a file where TensorBoard writes", "rnn --tensorboard notes.txt", 2,
     "error: --tensorboard notes.txt: exists and is not a folder"),
    ("a student written over a teacher adapter", "distil --model_path adapter-tiny --student_path adapter-tiny", 2,
     "error: --student_path adapter-tiny: holds a LoRA adapter; a student checkpoint written there would overwrite "
     "or mix with it, choose another folder"),
    ("an export over its base model", "export --model_path adapter-tiny --out tiny-gpt2", 1,
     "error: --out tiny-gpt2: is the adapter's base model, which the export would replace; choose another folder"),
    ("a flag the subcommand does not use", "export --model_path adapter-tiny --out x --dtype float16", 2,
     "error: unrecognized arguments: --dtype float16"),
    ("greedy with a temperature", "gen --greedy --temperature 0.7", 2,
     "error: --greedy takes the most likely token: --temperature would be ignored"),
    ("a beam setting without beams", "gen --length_penalty 0.8", 2,
     "error: --length_penalty is a beam-search setting: give --num_beams 2 or more"),
    ("beams with several samples", "gen --num_beams 4 --num_samples 2", 2,
     "error: --num_beams 4 returns the most likely hypothesis: --num_samples would be ignored"),
    ("beams past the context", "gen --gpt_variant tiny-gpt2 --num_beams 2 --max_new_tokens 200", 1,
     "error: beam search keeps the prompt (8 tokens) and --max_new_tokens 200 in the 128-token context"),
    ("a classification adapter given to gen", "gen --adapter adapter-tiny", 2,
     "error: --adapter adapter-tiny: a classification adapter; gen decodes with a language-model (CAUSAL_LM) "
     "adapter (classify with `python run.py predict --model_path adapter-tiny`)"),
    ("a folder without an adapter given to gen", "gen --adapter empty", 2,
     "error: --adapter empty: no adapter_config.json, not a LoRA adapter folder"),
    ("a language-model adapter given to predict", "predict --model_path lm-adapter --sentence Hi.", 2,
     "error: --model_path lm-adapter: a language-model (CAUSAL_LM) adapter; predict classifies (decode with "
     "`python run.py gen --adapter lm-adapter`)"),
    ("a data flag of gen without --dataset", "gen --prompt_column mr", 2,
     "error: --prompt_column is for --dataset (generation as evaluation): give --dataset too"),
    ("gen --dataset without the completion column", "gen --dataset pairs --prompt_column mr", 2,
     "error: --dataset decodes prompt -> completion pairs: give --completion_column too"),
    ("gen --dataset with a prompt", "gen --dataset pairs --prompt_column mr --completion_column ref --prompt Hi", 2,
     "error: --dataset decodes every prompt of its evaluation split, one output each: --prompt would be ignored"),
    ("gen --dataset with several samples",
     "gen --dataset pairs --prompt_column mr --completion_column ref --num_samples 2", 2,
     "error: --dataset decodes every prompt of its evaluation split, one output each: --num_samples would be "
     "ignored"),
    ("gen --dataset with a compiled step", "gen --dataset pairs --prompt_column mr --completion_column ref --compile",
     2, "error: --dataset decodes every prompt of its evaluation split, one output each: --compile would be ignored"),
    ("gen --dataset with a prompt column it lacks",
     "gen --gpt_variant tiny-gpt2 --dataset pairs --prompt_column meaning --completion_column ref", 2,
     "error: pairs/train.csv: --prompt_column meaning: no such column (there are: mr, ref)"),
    ("gen --dataset with beams past the context", "gen --gpt_variant tiny-gpt2 --dataset pairs --prompt_column mr "
     "--completion_column ref --num_beams 2 --max_new_tokens 125", 1,
     "error: beam search keeps the prompt and --max_new_tokens 125 in the 128-token context, and the longest prompt "
     "(with the separator) has 7 tokens; ask for fewer"),
    ("hub id offline or unknown", "gen --gpt_variant no-such-org/no-such-gpt2", 1,
     "error: could not get 'no-such-org/no-such-gpt2' from the Hugging Face hub"),
    ("rank 0", "LoRA --LoRA_rank 0", 2, "error: argument --LoRA_rank/--lora_rank: must be in [1, inf), got 0"),
    ("batch size 0", "LoRA --batch_size 0", 2, "error: argument --batch_size: must be in [1, inf), got 0"),
    ("negative epochs", "LoRA --epochs -1", 2, "error: argument --epochs: must be in [0, inf), got -1"),
    ("learning rate 0", "LoRA --lr 0", 2, "error: argument --lr: must be in (0, inf), got 0"),
    ("dropout 1", "LoRA --lora_dropout 1", 2, "error: argument --lora_dropout: must be in [0, 1), got 1"),
    ("unknown LoRA target", "LoRA --lora_targets attn.q_proj", 2,
     "error: argument --lora_targets: invalid choice: 'attn.q_proj'"),
    ("a file where a folder goes", "LoRA --model_path notes.txt/adapter", 2,
     "error: --model_path notes.txt/adapter: cannot write there"),
    ("an existing file as the adapter folder", "LoRA --model_path notes.txt", 2,
     "error: --model_path notes.txt: exists and is not a folder"),
    ("an existing file as the student folder", "rnn --model_path notes.txt", 2,
     "error: --model_path notes.txt: exists and is not a folder"),
    ("an existing file as the distilled student folder", "distil --model_path adapter-tiny --student_path notes.txt", 2,
     "error: --student_path notes.txt: exists and is not a folder"),
    ("an existing file as the export folder", "export --model_path adapter-tiny --out notes.txt", 2,
     "error: --out notes.txt: exists and is not a folder"),
    ("KD alpha above 1", "distil --alpha 1.5", 2, "error: argument --alpha: must be in [0, 1], got 1.5"),
    ("a compiled step with beams", "gen --compile --num_beams 2", 2,
     "error: --compile compiles the sampling step, which has no --num_beams: drop one of the two"),
    ("KD temperature 0", "distil --temperature 0", 2, "error: argument --temperature: must be in (0, inf), got 0"),
    ("a negative number of augmented sentences", "distil --augment -1", 2,
     "error: argument --augment: must be in [0, inf), got -1"),
    ("a mask probability above 1", "distil --p_mask 1.5", 2, "error: argument --p_mask: must be in [0, 1], got 1.5"),
    ("sampling from a teacher base that is gone", "distil --model_path adapter-lost-base --transfer_gen 10", 2,
     "error: --transfer_gen: the teacher's base ./lost-base cannot be loaded to sample from: it is no such folder"),
    ("no teacher adapter yet", "distil --model_path models/none", 1,
     "error: no LoRA adapter at models/none: train the teacher first with `python run.py LoRA --gpt_variant gpt2`"),
    ("teacher of another variant", "distil --model_path adapter-tiny --gpt_variant gpt2-medium", 1,
     "error: adapter-tiny: this adapter was trained on tiny-gpt2, not on --gpt_variant gpt2-medium"),
    ("truncated adapter weights", "predict --model_path corrupt-adapter --sentence Hi.", 1,
     "error: corrupt-adapter/adapter_model.safetensors: corrupt or truncated checkpoint"),
    ("corrupt adapter config", "predict --model_path bad-config --sentence Hi.", 1,
     "error: bad-config/adapter_config.json: corrupt adapter config"),
    ("a folder that holds no model", "predict --model_path empty --sentence Hi.", 1,
     "error: empty: neither a LoRA adapter folder (adapter_config.json), a trained head (head_config.json), a "
     "transformers classifier nor a student checkpoint (config.json)"),
    ("missing input file", "predict --model_path empty --input nope.txt", 2, "error: --input nope.txt: no such file"),
    ("a CoLA row with 3 columns", "rnn --data_dir cola-columns", 1,
     "error: cola-columns/in_domain_train.tsv:2: expected 4 tab-separated columns, found 3"),
    ("a label outside {0,1}", "rnn --data_dir cola-label", 1,
     "error: cola-label/in_domain_dev.tsv:1: label must be 0 or 1, found '7'"),
    ("an empty CoLA file", "rnn --data_dir cola-empty", 1, "error: cola-empty/out_of_domain_dev.tsv: no rows"),
    ("a CoLA file not in UTF-8", "rnn --data_dir cola-latin1", 1,
     "error: cola-latin1/in_domain_train.tsv:1: not UTF-8 text"),
    ("a negative seed", "rnn --seed -1", 2, "error: argument --seed: must be in [0, 4294967295], got -1"),
    ("a CUDA device where there is none", "LoRA --device cuda", 1,
     "error: --device cuda: no CUDA device is available here (use --device cpu)"),
    ("int8 for training", "LoRA --quantize int8", 2, "error: unrecognized arguments: --quantize int8"),
    ("an unknown quantization", "gen --quantize int4", 2, "error: argument --quantize: invalid choice: 'int4'"),
    ("--resume with nothing to resume", "rnn --resume --max_examples 8", 1,
     "error: --resume: no saved run at models/rnn.resume.pt; start the run without --resume"),
    ("a dataset that does not exist (or is not cached, offline)", "rnn --dataset no-such-org/no-such-dataset", 1,
     "error: could not load dataset 'no-such-org/no-such-dataset'"),
    ("a dataset config that does not exist", "rnn --dataset nyu-mll/glue --dataset_config no_such_config", 1,
     "error: could not load dataset 'nyu-mll/glue (no_such_config)'"),
    ("a dataset configuration for CoLA", "rnn --dataset_config sst2", 2,
     "error: --dataset_config sst2: CoLA's files have fixed splits and columns"),
    ("a dataset configuration for a folder", "rnn --dataset topics --dataset_config sst2", 2,
     "error: --dataset_config sst2: a local folder has no configurations"),
    ("a missing column", "rnn --dataset topics --text_column body", 1,
     "error: --text_column body: no such column (there are: sentence, label)"),
    ("a split that does not exist", "rnn --dataset topics --eval_split dev", 1,
     "error: --eval_split dev: no such split (there are: train, validation)"),
    ("a label column with one class only", "rnn --dataset one-class", 1,
     "error: one-class, split 'train': the label column 'label' has one class only ('a')"),
    ("a classification flag with --task lm", "LoRA --task lm --dataset pairs --label_column label", 2,
     "error: --label_column is for --task classify (labels): it does not apply to --task lm"),
    ("a language-model flag without --task lm", "LoRA --block_size 64", 2,
     "error: --block_size is for --task lm: it does not apply to --task classify"),
    ("a language model on CoLA", "LoRA --task lm", 2, "error: --task lm trains on text: give --dataset"),
    ("a prompt column without a completion column", "LoRA --task lm --dataset pairs --prompt_column mr", 2,
     "error: --completion_column is needed too: pairs have a prompt and a completion"),
    ("a missing prompt column", "LoRA --task lm --dataset pairs --prompt_column meaning --completion_column ref",
     2, "error: pairs/train.csv: --prompt_column meaning: no such column (there are: mr, ref)"),
    ("a missing completion column", "LoRA --task lm --dataset pairs --prompt_column mr --completion_column text",
     2, "error: pairs/train.csv: --completion_column text: no such column (there are: mr, ref)"),
    ("an empty completion", "LoRA --task lm --dataset empty-ref --prompt_column mr --completion_column ref", 2,
     "error: empty-ref/train.csv, row 1: the completion ('ref') is empty"),
    ("generation as evaluation without pairs", "LoRA --task lm --dataset pairs --generate_eval 20", 2,
     "error: --generate_eval decodes prompts: it needs prompt -> completion pairs (--prompt_column and "
     "--completion_column)"),
    ("a block past the context", "LoRA --task lm --gpt_variant tiny-gpt2 --dataset pairs --block_size 200", 2,
     "error: --block_size 200: over tiny-gpt2's context of 128 tokens"),
    ("an empty text cell", "rnn --dataset empty-text", 1,
     "error: empty-text/train.csv, row 1: the text ('sentence') is empty"),
    ("a text cell that is not a string", "rnn --dataset number-text", 1,
     "error: number-text/train.jsonl, row 0: the text ('sentence') is not a string (int)"),
    ("a --space flag the subcommand does not have", "tune rnn --search optuna --space no_such_flag=float:0:1", 2,
     "error: unrecognized arguments: --no_such_flag 0.0"),
    ("a --space log range from 0", "tune rnn --search optuna --space lr=log:0:1", 2,
     "error: --space lr=log:0:1: a log range needs bounds above 0"),
    ("an empty --space choice list", "tune rnn --search optuna --space rnn_cell=cat:", 2,
     "error: --space rnn_cell=cat:: expected cat:A,B,... (the choice list is empty, or holds an empty choice)"),
    ("a --space range reversed", "tune rnn --search optuna --space lr=float:0.1:0.01", 2,
     "error: --space lr=float:0.1:0.01: the low bound 0.1 must be below the high bound 0.01"),
    ("an infinite learning rate", "rnn --lr inf", 2,
     "error: argument --lr: must be a finite number (float32's largest is 3.4e+38), got inf"),
    ("a NaN flag", "distil --temperature nan", 2,
     "error: argument --temperature: must be a finite number (float32's largest is 3.4e+38), got nan"),
    ("labels mixing numbers and names", "rnn --dataset mixed-labels", 1,
     "error: mixed-labels/train.jsonl, row 1: the label ('label') is the name 'word' but row 0 holds the number 0; "
     "a label column holds names or numbers, not both"),
    ("a list of labels per row (multi-label data)", "rnn --dataset list-labels", 1,
     "error: list-labels/train.jsonl, row 0: the label ('label') is [0, 1]; a label is one class, a name or an "
     "integer (multi-label and regression data are not supported)"),
    ("a training file with a header only", "rnn --dataset header-only", 1,
     "error: header-only/train.csv: no rows (a header at most)"),
    ("a data file that datasets cannot parse", "rnn --dataset extra-field", 1,
     "error: extra-field/train.csv: cannot read it (Error tokenizing data. C error: Expected 2 fields in line 3, "
     "saw 3)"),
    ("a validation file without the label column", "rnn --dataset unlabelled-dev", 1,
     "error: unlabelled-dev/validation.csv: no label column 'label' (there are: sentence)"),
    ("an adapter config with rank 0", "predict --model_path rank-zero --sentence Hi.", 1,
     "error: rank-zero/adapter_config.json: r must be a positive integer, found 0"),
    ("a student config with 0 layers", "predict --model_path no-layers --sentence Hi.", 1,
     "error: no-layers/config.json: layers must be a positive integer, found 0"),
    ("a text file of spaces and blank lines", "LoRA --task lm --gpt_variant tiny-gpt2 --dataset blank.txt", 2,
     "error: --dataset blank.txt: holds no text, only spaces and blank lines"),
    ("a text file whose validation part is blank", "LoRA --task lm --gpt_variant tiny-gpt2 --dataset tail-blank.txt",
     2, "error: --dataset tail-blank.txt: its validation part (line 10: the file is cut at 90%) holds no text, only "
     "spaces and blank lines"),
    ("an empty text file", "LoRA --task lm --gpt_variant tiny-gpt2 --dataset empty.txt", 2,
     "error: --dataset empty.txt: empty"),
    ("every pair longer than the block", "LoRA --task lm --gpt_variant tiny-gpt2 --dataset long-pairs --prompt_column "
     "mr --completion_column ref --block_size 16", 2,
     "error: long-pairs: all 2 pairs of the train split are longer than --block_size 16 tokens (the shortest has "
     "32); give a larger --block_size"),
    ("a NaN length penalty", "gen --num_beams 2 --length_penalty nan", 2,
     "error: argument --length_penalty: must be a finite number (float32's largest is 3.4e+38), got nan"),
    ("an augmentation rate without --augment", "distil --p_mask 0.5", 2,
     "error: --p_mask 0.5 is a rate of --augment's rules: give --augment N too (without it no sentence is augmented)"),
    ("a folder where the study's database goes", "tune rnn --search optuna --space lr=log:1e-4:1e-3 --name clash", 2,
     "error: tuning/clash.db: not a file, where the study clash keeps its trials (its database); move it away, or "
     "give another --name or a --storage"),
    ("a database kind SQLAlchemy does not know",
     "tune rnn --search optuna --space lr=log:1e-4:1e-3 --storage nosuchdb://me:pw@host/db", 2,
     "error: --storage nosuchdb://me:***@host/db: SQLAlchemy knows no database 'nosuchdb'"),
    ("a database whose driver is not installed",
     "tune rnn --search optuna --space lr=log:1e-4:1e-3 --storage mysql://me:pw@host/db", 2,
     "error: --storage mysql://me:***@host/db: needs its driver, the Python module MySQLdb: pip install 'mysqlclient'"),
    ("greedy with a top-k", "gen --greedy --top_k 5", 2,
     "error: --greedy takes the most likely token: --top_k would be ignored"),
    ("beams with a top-k", "gen --num_beams 2 --top_k 5", 2,
     "error: --num_beams 2 returns the most likely hypothesis: --top_k would be ignored"),
    ("greedy with several samples", "gen --greedy --num_samples 2", 2,
     "error: --greedy decodes the same tokens from every seed: --num_samples 2 would print one sample that many "
     "times"),
    ("a KD temperature with the squared-distance loss", "distil --kd_loss mse --temperature 3", 2,
     "error: --temperature 3.0 is the KL loss' temperature: --kd_loss mse compares the logits themselves, it would "
     "be ignored"),
    ("a text column with pairs", "LoRA --task lm --dataset pairs --prompt_column mr --completion_column ref "
     "--text_column mr", 2, "error: --text_column mr: --task lm trains on prompt -> completion pairs; it would be "
     "ignored"),
    ("a text column with a text file", "LoRA --task lm --dataset notes.txt --text_column body", 2,
     "error: --text_column body: --task lm trains on the text file(s) notes.txt; it would be ignored"),
    ("a data flag with --sentence", "predict --model_path no-layers --sentence Hi. --text_column body", 2,
     "error: --text_column body: --sentence classifies the sentences given, it would be ignored"),
    ("a dataset with --input", "predict --model_path no-layers --input notes.txt --dataset topics", 2,
     "error: --dataset topics: --input classifies its file, it would be ignored"),
    ("a GPT-2 variant for a student", "predict --model_path no-layers --sentence Hi. --gpt_variant tiny-gpt2", 2,
     "error: --gpt_variant tiny-gpt2: --model_path no-layers holds an RNN student, not a GPT-2 classifier: it "
     "would be ignored"),
    ("int8 for a student", "predict --model_path no-layers --sentence Hi. --quantize int8", 2,
     "error: --quantize int8: --model_path no-layers holds an RNN student, not a GPT-2 classifier: it would be "
     "ignored"),
    ("a split of a text file", "LoRA --task lm --dataset notes.txt --eval_split dev", 2,
     "error: --eval_split dev: --task lm trains on the text file(s) notes.txt; it would be ignored"),
    ("a parquet input that is not parquet", "predict --model_path no-layers --input broken.parquet", 1,
     "error: --input broken.parquet: cannot read it (Parquet magic bytes not found in footer. Either the file is "
     "corrupted or this is not a parquet file.)"),
    ("no runs folder for the report", "report --runs no/such/runs", 2, "error: --runs no/such/runs: no such folder"),
    ("a file as the report's folder", "report --out notes.txt", 2, "error: --out notes.txt: exists and is not a folder"),
    ("a run id no record has", "report --run 0123456789ab", 1,
     "error: --run 0123456789ab: no run record has this id (the report lists each run's id)"),
]


# These run as `python run.py` in a process of their own, which pins the entry point itself; the other cases call
# run.main in the test's process, which is all that entry point does.
AS_PROCESS = {"no subcommand", "hub id offline or unknown", "truncated adapter weights", "a CoLA file not in UTF-8",
              "a CUDA device where there is none"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, cola_dir, tiny_gpt_dir):
    """A folder holding the inputs the cases refer to."""
    d = tmp_path_factory.mktemp("errors")
    save_tiny_gpt2(d / "tiny-gpt2")
    save_tiny_gpt2(d / "small-vocab", vocab_size=300)
    save_tiny_gpt2(d / "relu-gpt2", activation_function="relu")
    (d / "notes.txt").write_text("a file\n")
    (d / "latin1.txt").write_bytes(b"Caf\xe9 au lait")
    (d / "empty").mkdir()
    for name in ("adapter-tiny", "corrupt-adapter", "bad-config"):
        save_tiny_adapter(d / name, str(d / "tiny-gpt2"), base_model="tiny-gpt2", run_info={})
    save_tiny_adapter(d / "adapter-lost-base", str(d / "tiny-gpt2"), base_model="./lost-base", run_info={})
    lm_config = json.loads((d / "adapter-tiny" / "adapter_config.json").read_text()) | {"task_type": "CAUSAL_LM"}
    (d / "lm-adapter").mkdir()
    (d / "lm-adapter" / "adapter_config.json").write_text(json.dumps(lm_config))  # what the check reads
    weights = d / "corrupt-adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (d / "bad-config" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    good = {name: Path(cola_dir, name).read_bytes() for name in
            ("in_domain_train.tsv", "in_domain_dev.tsv", "out_of_domain_dev.tsv")}
    broken = {"cola-columns": ("in_domain_train.tsv", b"a\t1\t\tFine.\nb\t1\tno sentence\n"),
              "cola-label": ("in_domain_dev.tsv", b"a\t7\t\tSeven.\n"),
              "cola-empty": ("out_of_domain_dev.tsv", b""),
              "cola-latin1": ("in_domain_train.tsv", b"a\t1\t\tCaf\xe9.\n")}
    for folder, (name, content) in broken.items():
        (d / folder).mkdir()
        for n, data in good.items():
            (d / folder / n).write_bytes(content if n == name else data)
    (d / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    (d / "blank.txt").write_text("   \n\n \t \n" * 20)
    (d / "empty.txt").write_text("")
    (d / "tail-blank.txt").write_text("Some text.\n" + "\n" * 8 + "  \n")
    (d / "tuning" / "clash.db").mkdir(parents=True)
    config = d / "rank-zero" / "adapter_config.json"
    shutil.copytree(d / "adapter-tiny", d / "rank-zero")
    config.write_text(json.dumps(json.loads(config.read_text()) | {"r": 0}))
    save_student(DistilRNN(RNNConfig(hidden=8, layers=1)), d / "no-layers", {})
    config = d / "no-layers" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"layers": 0}))
    tables = {"topics": ("train.csv", "sentence,label\nA goal.,sport\nSoup.,food\n"),
              "mixed-labels": ("train.jsonl", '{"sentence": "A.", "label": 0}\n{"sentence": "B.", "label": "word"}\n'),
              "list-labels": ("train.jsonl", '{"sentence": "A.", "label": [0, 1]}\n{"sentence": "B.", "label": [1]}\n'),
              "header-only": ("train.csv", "sentence,label\n"),
              "extra-field": ("train.csv", "sentence,label\nA goal.,sport\nSoup.,food,hot\n"),
              "one-class": ("train.csv", "sentence,label\nA goal.,a\nSoup.,a\n"),
              "empty-text": ("train.csv", "sentence,label\nA goal.,sport\n,food\n"),
              "pairs": ("train.csv", "mr,ref\nname[Aromi],Aromi is a pub.\nname[B],B is a cafe.\n"),
              "long-pairs": ("train.csv", "mr,ref\n" + "name[The Eagle] eatType[coffee shop] near[Burger King],The "
                             "Eagle is a coffee shop near Burger King by the river.\n" * 2),
              "empty-ref": ("train.csv", "mr,ref\nname[A],A is a pub.\nname[B],\n"),
              "number-text": ("train.jsonl", '{"sentence": 5, "label": "a"}\n{"sentence": 6, "label": "b"}\n')}
    for folder, (name, content) in tables.items():
        (d / folder).mkdir()
        (d / folder / name).write_text(content)
        (d / folder / name.replace("train", "validation")).write_text(content)
    (d / "header-only" / "validation.csv").write_text("sentence,label\nA goal.,sport\nSoup.,food\n")
    shutil.copytree(d / "topics", d / "unlabelled-dev")
    (d / "unlabelled-dev" / "validation.csv").write_text("sentence\nA match.\n")
    return d


def snapshot(folder):
    return {p: p.stat().st_mtime_ns for p in Path(folder).rglob("*")}


@pytest.mark.parametrize("what, command, code, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input(workdir, what, command, code, message, monkeypatch, capfd):
    before = snapshot(workdir)
    if what in AS_PROCESS:
        result = run_cli(*command.split(), cwd=workdir)
    else:
        result = run_main(*command.split(), cwd=workdir, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == code, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert snapshot(workdir) == before  # nothing written, nothing half-written


def test_a_file_where_run_results_go_is_refused_before_training(tmp_path, monkeypatch, capfd):
    (tmp_path / "plots").write_text("not a folder")
    result = run_main("rnn", "--max_examples", 8, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: plots: a file is where run results go (the folder plots/); move it away")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots"]


def test_docs_errors_shows_every_case():
    readme = (ROOT / "docs" / "errors.md").read_text()
    for what, command, code, message in CASES:
        row = f"| {what} | `python run.py {command}`".replace("python run.py `", "python run.py`")
        assert row in readme and message.replace("|", "\\|") in readme, what


def test_unexpected_failure_is_one_line_with_a_hint(monkeypatch, capsys):
    def broken(config, device, dtype):
        raise RuntimeError("something deep broke\nwith detail")

    monkeypatch.setitem(run.COMMANDS, "gen", broken)
    assert run.main(["gen"]) == 1
    err = capsys.readouterr().err
    assert err == "error: unexpected RuntimeError: something deep broke (rerun with --debug for the traceback)\n"
    with pytest.raises(RuntimeError):
        run.main(["gen", "--debug"])


def test_nan_loss_stops_with_the_epoch_and_keeps_the_last_good_state(tiny_gpt_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def poison_after_first_step(optimizer):
        """Epoch 2's first optimizer step leaves a NaN in a trainable tensor, so step 2's loss is NaN."""
        step = optimizer.step

        def step_then_nan(*args, **kwargs):
            out = step(*args, **kwargs)
            optimizer.step = step
            with torch.no_grad():
                optimizer.param_groups[0]["params"][0].fill_(float("nan"))
            return out

        optimizer.step = step_then_nan

    in_epoch(monkeypatch, 2, lambda model, split, loss_fn, optimizer: poison_after_first_step(optimizer))
    args = ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "64", "--batch_size", "16", "--epochs", "3",
            "--model_path", "adapter"]
    assert run.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: epoch 2/3: loss became nan at step 2; try a lower --lr "
                          "(the state after epoch 1 is in adapter.resume.pt)")
    state = torch.load(tmp_path / "adapter.resume.pt", weights_only=True)
    assert state["epoch"] == 1 and not (tmp_path / "adapter").exists()


def test_killed_run_resumes_to_the_same_weights(resumable_run, tmp_path, monkeypatch, capfd):
    args, reference = resumable_run
    proc = start_run(args, tmp_path)
    state = tmp_path / "adapter.resume.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    assert saved_epoch < 3
    resumed = run_main(*args, "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after epoch {saved_epoch}" in resumed.stdout + resumed.stderr
    assert_same_weights(reference, tmp_path)
    assert not state.exists()
    [record] = [json.loads(line) for line in (tmp_path / "tuning" / "LoRA.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]


def test_ctrl_c_saves_nothing_partial_and_resume_refuses_other_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def ctrl_c(*args):
        raise KeyboardInterrupt

    in_epoch(monkeypatch, 2, ctrl_c)
    args = ["rnn", "--max_examples", "32", "--batch_size", "16", "--epochs", "2", "--rnn_hidden", "8"]
    assert run.main(args) == 130
    assert capsys.readouterr().err == ("error: interrupted during epoch 2; the state after epoch 1 is in "
                                       "models/rnn.resume.pt; rerun the same command with --resume to continue\n")
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "models" / "rnn").exists()
    assert run.main(args[:-2] + ["--rnn_hidden", "8", "--lr", "0.01", "--resume"]) == 1
    assert "saved with --lr 0.001, this run has --lr 0.01" in capsys.readouterr().err
    assert run.main(args + ["--resume"]) == 0
    assert (tmp_path / "models" / "rnn" / "model.safetensors").exists()
    assert not (tmp_path / "models" / "rnn.resume.pt").exists()


@pytest.mark.parametrize("mode", ["rnn", "distil"])
def test_zero_epochs_prints_the_student_size_and_writes_nothing(mode, workdir, monkeypatch, capfd):
    before = snapshot(workdir)
    extra = ["--model_path", "adapter-tiny"] if mode == "distil" else []
    result = run_main(mode, "--epochs", 0, *extra, cwd=workdir, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Number of parameters: 40.96M"
    assert snapshot(workdir) == before
