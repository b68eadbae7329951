"""torchrun: two CPU processes (gloo) give the same model and metrics as one process with the same global batch;
only rank 0 writes; the teacher runs once per sentence in total."""
import json
import os
from pathlib import Path

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
