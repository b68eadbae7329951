"""torchrun: two CPU processes (gloo) give the same model and metrics as one process with the same global batch;
only rank 0 writes; the teacher runs once per sentence in total."""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import (COLA_DEV, COLA_HELDOUT, COLA_OOD, assert_same_run, count_classifier_rows, free_port,
                      run_once_and_on_two_ranks)


def test_lora_on_two_ranks_equals_one_process(tiny_gpt_dir, tmp_path):
    ddp = run_once_and_on_two_ranks(["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", 256, "--batch_size", 64,
                                     "--epochs", 2, "--dtype", "float32", "--model_path", "adapter"], tmp_path)
    assert ddp.stdout.count("Number of parameters") == 1  # only rank 0 prints
    assert_same_run(tmp_path / "one", tmp_path / "two", "LoRA", "adapter/adapter_model.safetensors")


def test_distil_on_two_ranks_equals_one_process(two_target_adapter_dir, tmp_path):
    run_once_and_on_two_ranks(["distil", "--model_path", two_target_adapter_dir, "--max_examples", 256,
                               "--batch_size", 64, "--epochs", 2, "--rnn_hidden", 16, "--dtype", "float32"], tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two", "distil", "models/distil-rnn/model.safetensors")


def count_teacher_rows(rank, world, port, adapter, workdir):
    """One rank of a distil run (spawned), counting the sentences its teacher forward sees."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    os.chdir(workdir)
    import run
    seen = count_classifier_rows()
    code = run.main(["distil", "--model_path", str(adapter), "--max_examples", "64", "--epochs", "1",
                     "--rnn_hidden", "8", "--dtype", "float32"])
    Path(workdir, f"rank{rank}.json").write_text(json.dumps({"code": code, "rows": sum(seen)}))


def test_teacher_runs_once_per_sentence_across_ranks(two_target_adapter_dir, tmp_path):
    torch.multiprocessing.spawn(count_teacher_rows, args=(2, free_port(), two_target_adapter_dir, tmp_path), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert sum(r["rows"] for r in ranks) == 64 + COLA_HELDOUT + COLA_DEV + COLA_OOD
    assert all(r["rows"] > 0 for r in ranks)
    assert len((tmp_path / "tuning" / "distil.jsonl").read_text().splitlines()) == 1


def test_lm_on_two_ranks_equals_one_process(tiny_gpt_dir, tmp_path):
    """Pairs of different lengths: the ranks' pieces hold different numbers of target tokens, and the step is still
    the batch's mean over them, as in one process."""
    data = tmp_path / "pairs"
    data.mkdir()
    rows = "".join(f'{{"mr": "name[{w}]{", near[x]" * (i % 4)}", "ref": "{w} is {"a nice " * (i % 3)}pub."}}\n'
                   for i, w in enumerate(["Aromi", "Cotto", "Zizzi", "Alimentum", "Vaults", "Wrestlers"] * 4))
    (data / "train.jsonl").write_text(rows)
    (data / "validation.jsonl").write_text("".join(rows.splitlines(keepends=True)[:8]))
    run_once_and_on_two_ranks(["LoRA", "--task", "lm", "--gpt_variant", tiny_gpt_dir, "--dataset", data,
                               "--prompt_column", "mr", "--completion_column", "ref", "--batch_size", 6, "--epochs", 2,
                               "--lr", 1e-2, "--dtype", "float32", "--model_path", "lm"], tmp_path)
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "lm" / "adapter_model.safetensors") for run in ("one", "two"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    [one], [two] = ([json.loads(line) for line in (tmp_path / run / "tuning" / "LoRA-pairs.jsonl").read_text()
                     .splitlines()] for run in ("one", "two"))
    for h1, h2 in zip(one["history"], two["history"], strict=True):
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
        assert h1["dev_perplexity"] == pytest.approx(h2["dev_perplexity"], rel=1e-5)
    assert one["baseline_dev_perplexity"] == pytest.approx(two["baseline_dev_perplexity"], rel=1e-5)
