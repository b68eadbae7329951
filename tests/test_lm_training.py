"""LoRA --task lm: the next-token loss and perplexity against transformers' GPT2LMHeadModel, prompt tokens that are
never targets, learning on a small corpus beside the untrained base model, and the adapter in PEFT's CAUSAL_LM
format both ways."""
import json
import math

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import randomize_adapter, run_main
from model import GPT, inject_lora, mark_only_lora_as_trainable
from textdata.batches import IGNORE, collate
from textdata.lm_examples import completion_example, lm_split, load_lm_splits, text_blocks
from training import checkpoints
from training.lm_objective import NextToken, next_token_loss

CPU = torch.device("cpu")
WORDS = "the cat dog sat on mat log and ran to a big small red".split()


def corpus(lines, seed=0):
    """`lines` lines of eight words from a small vocabulary: text a tiny model can learn in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    return "\n".join(" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=g)) + "."
                     for _ in range(lines)) + "\n"


PAIRS = [("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
         ("name[Alimentum], food[Chinese], area[riverside]", "Alimentum serves Chinese food by the river."),
         ("name[Cotto]", "Cotto.")]


def hf_inputs(split, rows):
    """transformers' form of our (inputs, targets) rows: its labels are the tokens themselves, shifted inside the
    model, so each row is its inputs plus the last target, labelled -100 where ours has no target, padded."""
    ids, labels = [], []
    for i in rows:
        x, y = split.tokens[i], split.targets[i]
        ids.append(x + [y[-1]])
        labels.append([IGNORE] + y)
    width = max(map(len, ids))
    return (torch.tensor([s + [50256] * (width - len(s)) for s in ids]),
            torch.tensor([s + [IGNORE] * (width - len(s)) for s in labels]))


@pytest.fixture(scope="module")
def models(tiny_gpt_dir):
    ours = GPT.from_pretrained(tiny_gpt_dir).eval()
    return ours, GPT2LMHeadModel.from_pretrained(tiny_gpt_dir).eval()


@pytest.mark.parametrize("kind", ["blocks", "pairs"])
def test_loss_and_perplexity_are_transformers_lm_loss(models, tokenizer, kind):
    ours, theirs = models
    if kind == "blocks":
        split = lm_split(text_blocks(tokenizer, [corpus(6), corpus(3, seed=1)], block_size=24))
    else:
        split = lm_split([completion_example(tokenizer, p, c) for p, c in PAIRS])
    rows = list(range(len(split)))
    ids, lengths, targets, _ = collate(split, rows, CPU)
    hf_ids, hf_labels = hf_inputs(split, rows)
    with torch.no_grad():
        loss = next_token_loss(ours(ids), targets)
        expected = theirs(input_ids=hf_ids, labels=hf_labels).loss
        dev = NextToken().evaluate(ours, split, batch_size=2, device=CPU, dtype=torch.float32)
    assert abs(float(loss) - float(expected)) <= 1e-5
    assert abs(dev["loss"] - float(expected)) <= 1e-5  # two batches, summed per token, = one mean
    assert dev["perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-5)
    assert dev["target_tokens"] == int((hf_labels != IGNORE).sum()) == split.units(rows)


def test_prompt_tokens_are_inputs_never_targets(models, tokenizer):
    ours, _ = models
    prompt, completion = PAIRS[0]
    x, y = completion_example(tokenizer, prompt, completion)
    context = len(tokenizer.encode_ordinary(prompt)) + 1  # the separator ends the context
    assert y[:context - 1] == [IGNORE] * (context - 1) and y[context - 1:] == tokenizer.encode(completion) + [50256]
    ids, targets = torch.tensor([x]), torch.tensor([y])
    with torch.no_grad():
        logits = ours(ids)
    loss = next_token_loss(logits, targets)
    scrambled = logits.clone()
    scrambled[:, :context - 1] = torch.randn_like(scrambled[:, :context - 1]) * 10  # what the prompt would predict
    assert torch.equal(next_token_loss(scrambled, targets), loss)
    changed = targets.clone()
    changed[0, context] = (changed[0, context] + 1) % 50257  # one completion token
    assert next_token_loss(logits, changed) != loss


def write_corpus(folder):
    folder.mkdir()
    (folder / "train.txt").write_text(corpus(12) * 3)
    (folder / "validation.txt").write_text(corpus(12)[:200])
    return folder


def test_lm_run_learns_and_reports_the_untrained_base(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    write_corpus(tmp_path / "words")
    result = run_main("LoRA", "--task", "lm", "--gpt_variant", tiny_gpt_dir, "--dataset", "words", "--block_size", 32,
                      "--epochs", 3, "--lr", 3e-2, "--LoRA_rank", 8, "--dtype", "float32", "--model_path", "lm",
                      cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "tuning" / "LoRA-words.jsonl").read_text().splitlines()[-1])
    assert record["task"] == "lm" and record["finished"]
    ppl = [h["dev_perplexity"] for h in record["history"]]
    assert record["dev_perplexity"] == min(ppl) < record["baseline_dev_perplexity"] / 4
    assert record["best_epoch"] == 1 + ppl.index(min(ppl))
    assert "base model, untrained" in result.stdout and f"{record['baseline_dev_perplexity']:.2f}" in result.stdout
    assert (tmp_path / "plots" / "LoRA-words_perplexity.png").exists()
    assert checkpoints.adapter_task(tmp_path / "lm") == "CAUSAL_LM"


def trained_lm(gpt_dir):
    """The tiny GPT-2 with LoRA on two targets, every trainable tensor random as after training (the same each call)."""
    torch.manual_seed(0)  # LoRA's A starts random
    model = GPT.from_pretrained(gpt_dir)
    mark_only_lora_as_trainable(inject_lora(model, 4, 8, targets=("attn.c_attn", "mlp.c_fc")))
    randomize_adapter(model)
    return model


def test_our_causal_lm_adapter_is_peft_s_and_exports_as_peft_merges(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    from peft import PeftModel
    model = trained_lm(tiny_gpt_dir).eval()
    checkpoints.save_trained(model, tmp_path / "ours", {"gpt_variant": tiny_gpt_dir, "random_init": False, "seed": 0})
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt_dir), tmp_path / "ours").eval()
    ids = torch.tensor([[464, 3797, 3332, 13, 40, 716]])
    with torch.no_grad():
        expected = model(ids)
        assert (theirs(input_ids=ids).logits - expected).abs().max() <= 1e-5
        assert (checkpoints.load_lora_lm(tmp_path / "ours")(ids) - expected).abs().max() <= 1e-5
    result = run_main("export", "--model_path", tmp_path / "ours", "--out", tmp_path / "merged", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        assert (merged - theirs.merge_and_unload()(input_ids=ids).logits).abs().max() <= 1e-5


def test_pairs_longer_than_the_block_are_left_out_and_said(tokenizer, tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = "".join(f'{{"mr": "{p}", "ref": "{c}"}}\n' for p, c in PAIRS)
    (folder / "train.jsonl").write_text(rows)
    (folder / "validation.jsonl").write_text(rows)
    from textdata.readers import DataSpec
    splits = load_lm_splits(DataSpec(dataset=str(folder)), tokenizer, block_size=17, prompt_column="mr",
                            completion_column="ref")
    assert len(splits["train"]) == 2 and all(len(x) <= 17 for x in splits["train"].tokens)
    assert splits.notes == ["1 pairs of train longer than --block_size 17 tokens left out",
                            "1 pairs of dev longer than --block_size 17 tokens left out"]


def test_micro_batches_weigh_each_target_token_once(tiny_gpt_dir, tokenizer):
    """Pieces hold different numbers of target tokens (pairs of different lengths): the step's gradient is still the
    whole batch's mean over its target tokens, as one piece gives it (a mean of piece means would not be)."""
    from train_utils import train_epoch
    split = lm_split([completion_example(tokenizer, p, c) for p, c in PAIRS * 2])
    after = []
    for tokens in (None, 30):  # 30 padded tokens: one pair per piece
        model = trained_lm(tiny_gpt_dir)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        sums = train_epoch(model, split, NextToken(), opt, batch_size=len(split), generator=torch.Generator(),
                           device=CPU, dtype=torch.float32, micro_batch_tokens=tokens)
        after.append(([p.detach().clone() for p in model.parameters() if p.requires_grad], sums))
    (whole, whole_sums), (pieces, piece_sums) = after
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(whole, pieces))
    assert piece_sums["units"] == whole_sums["units"] == split.units(range(len(split)))
    assert piece_sums["loss"] == pytest.approx(whole_sums["loss"], rel=1e-6)


LM_RUN = ["LoRA", "--task", "lm", "--dataset", "words", "--block_size", 32, "--dtype", "float32", "--lr", 3e-2]


def test_an_lm_run_resumes_after_its_last_epoch(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    write_corpus(tmp_path / "words")
    run = [*LM_RUN, "--gpt_variant", tiny_gpt_dir]
    whole = run_main(*run, "--epochs", 2, "--model_path", "whole", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert whole.returncode == 0 and not (tmp_path / "whole.resume.pt").exists()  # finished: no state left behind
    from training import run_watch
    monkeypatch.setattr(run_watch.RunWatch, "epoch", stop_after(run_watch.RunWatch.epoch, epoch=1))
    stopped = run_main(*run, "--epochs", 2, "--model_path", "cut", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert stopped.returncode == 130 and (tmp_path / "cut.resume.pt").exists(), stopped.stderr
    monkeypatch.undo()
    resumed = run_main(*run, "--epochs", 2, "--model_path", "cut", "--resume", cwd=tmp_path, monkeypatch=monkeypatch,
                       capfd=capfd)
    assert resumed.returncode == 0 and "resuming after epoch 1" in resumed.stdout + resumed.stderr, resumed.stderr
    records = [json.loads(line) for line in (tmp_path / "tuning" / "LoRA-words.jsonl").read_text().splitlines()]
    cut, straight = records[-1], next(r for r in records if r["config"]["model_path"] == "whole")
    assert [h["dev_loss"] for h in cut["history"]] == [h["dev_loss"] for h in straight["history"]]


def stop_after(watch_epoch, epoch):
    """RunWatch.epoch, then Ctrl-C once `epoch` is saved: what a user's interrupt between two epochs does."""
    def wrapped(self, run):
        watch_epoch(self, run)
        if run["epoch"] == epoch:
            raise KeyboardInterrupt
    return wrapped


def test_tune_sweeps_lm_runs_by_dev_perplexity(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    write_corpus(tmp_path / "words")
    result = run_main("tune", "LoRA", "--seeds", 0, "--grid", "lr=0.003,0.03", "--epochs", 1, "--name", "lm",
                      *LM_RUN[1:-2], "--gpt_variant", tiny_gpt_dir, cwd=tmp_path, monkeypatch=monkeypatch,
                      capfd=capfd)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "tuning" / "lm.md").read_text()
    records = [json.loads(line) for line in (tmp_path / "tuning" / "LoRA-words.jsonl").read_text().splitlines()]
    best = min(records, key=lambda r: r["dev_perplexity"])
    assert f"Best by mean dev perplexity: **lr={best['config']['train']['lr']}**" in summary
    assert f"untrained: {best['baseline_dev_perplexity']:.2f} dev perplexity" in summary
    assert (tmp_path / "plots" / "tune_lm.png").exists()


def test_an_optuna_search_of_lm_runs_minimizes_perplexity(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    write_corpus(tmp_path / "words")
    result = run_main("tune", "LoRA", "--search", "optuna", "--space", "lr=cat:0.003,0.03", "--trials", 2,
                      "--sampler", "random", "--seeds", 0, "--epochs", 1, "--name", "s", *LM_RUN[1:-2],
                      "--gpt_variant", tiny_gpt_dir, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "tuning" / "s.md").read_text()
    assert "scored by its mean dev perplexity (lower is better)" in summary and "dev token accuracy" in summary
    import optuna
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/tuning/s.db")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_value == min(t.value for t in study.trials)


def test_generate_eval_after_training_is_gen_dataset_on_the_adapter(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = "".join(f'{{"mr": "{p}", "ref": "{c}"}}\n' for p, c in PAIRS)
    (folder / "train.jsonl").write_text(rows * 4)
    (folder / "validation.jsonl").write_text(rows)
    pairs = ["--dataset", "pairs", "--prompt_column", "mr", "--completion_column", "ref"]
    trained = run_main("LoRA", "--task", "lm", "--gpt_variant", tiny_gpt_dir, *pairs, "--epochs", 1, "--lr", 3e-2,
                       "--dtype", "float32", "--model_path", "lm", "--generate_eval", 6, cwd=tmp_path,
                       monkeypatch=monkeypatch, capfd=capfd)
    assert trained.returncode == 0, trained.stderr
    assert "BLEU" in trained.stdout and "ROUGE-L" in trained.stdout
    out = tmp_path / "tuning" / "gen-pairs.jsonl"
    after_training = out.read_text()
    assert len(after_training.splitlines()) == len(PAIRS)
    decoded = run_main("gen", "--adapter", "lm", *pairs, "--greedy", "--max_new_tokens", 6, "--dtype", "float32",
                       cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert decoded.returncode == 0, decoded.stderr
    assert out.read_text() == after_training
