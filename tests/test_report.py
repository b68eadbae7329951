"""`run.py report` and the model cards, on records made by short real runs (a tiny GPT-2, 32 training sentences):
every number the report shows is its record's, in Markdown and in HTML; an unfinished run is never a result; the
HTML needs nothing but itself; a model folder's card gives back the run's dev scores, survives export."""
import base64
from html.parser import HTMLParser
import re
import shutil
from pathlib import Path

import pytest

from config.records import read_records
from conftest import ROOT, run_main
import run
from training.checkpoints import CARD_MARKER
from training.run_watch import RunWatch

TINY_RNN = ["--max_examples", "32", "--batch_size", "16", "--epochs", "1", "--rnn_hidden", "8"]


def stop_after_first_epoch(monkeypatch):
    """Make the next training run stop as Ctrl-C would once its first epoch is logged: its record stays unfinished."""
    epoch = RunWatch.epoch

    def then_interrupt(self, run_state):
        epoch(self, run_state)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunWatch, "epoch", then_interrupt)


@pytest.fixture(scope="module")
def runs(tiny_gpt_dir, tmp_path_factory):
    """A folder of runs as a student leaves it: gen, LoRA, export, rnn, distil, a sweep (a second rnn run), an rnn
    run stopped mid-way, a log line cut short; then the report of it."""
    folder = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        commands = [["gen", "--gpt_variant", tiny_gpt_dir, "--max_new_tokens", "6", "--num_samples", "2"],
                    ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "32", "--epochs", "1",
                     "--model_path", "models/lora"],
                    ["export", "--model_path", "models/lora", "--out", "models/merged"],
                    ["rnn", *TINY_RNN, "--model_path", "models/rnn"],
                    ["distil", *TINY_RNN, "--model_path", "models/lora", "--student_path", "models/distil"],
                    ["tune", "rnn", "--seeds", "3", "--grid", "lr=0.002", "--name", "rates", *TINY_RNN]]
        for argv in commands:
            assert run.main(argv) == 0, argv
        stop_after_first_epoch(mp)
        assert run.main(["rnn", *TINY_RNN, "--epochs", "2", "--seed", "2", "--model_path", "models/rnn2"]) == 130
        mp.undo()
        mp.chdir(folder)
        with open("tuning/rnn.jsonl", "a", encoding="utf-8") as log:
            log.write('{"schema": 2, "mode": "rnn", "config"\n')  # a line cut short by a full disk
        (folder / "report").mkdir()
        (folder / "report" / "notes.txt").write_text("mine\n")
        assert run.main(["report"]) == 0
    return folder


def records(folder, mode):
    return read_records(folder / "tuning" / f"{mode}.jsonl")


class HTMLText(HTMLParser):
    """The text, tags, images and links of an HTML page."""

    def __init__(self, page):
        super().__init__()
        self.text, self.tags, self.images, self.urls = [], [], [], []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "src" and tag == "img":
                self.images.append(value)
            elif name in ("src", "href", "action", "data", "poster"):
                self.urls.append(value)

    def handle_data(self, data):
        self.text.append(data)


def both(folder):
    """(the Markdown, the HTML's text) of the report."""
    md = (folder / "report" / "report.md").read_text(encoding="utf-8")
    page = HTMLText((folder / "report" / "report.html").read_text(encoding="utf-8"))
    return md, "".join(page.text)


def percent(v):
    return f"{100 * v:.1f}%"


def interval(pair, write):
    return f"[{write(pair[0])}, {write(pair[1])}]"


def mcc(v):
    return f"{v:+.3f}"


def test_every_number_in_the_report_is_its_records_in_both_formats(runs):
    lora, = records(runs, "LoRA")
    distil, = records(runs, "distil")
    gen, = records(runs, "gen")
    expected = [lora.get("run_id"), distil.get("run_id"), lora["commit"] or "not recorded",
                f"{lora['parameters'] / 1e6:.2f}M",
                f"{100 * (1 - lora['trainable_parameters'] / lora['parameters']):.2f}%",
                f"{lora['wall_seconds']:.1f} s", lora["command"], *gen["samples"], gen["prompt"]]
    for record in (lora, distil):
        for split in ("dev", "ood"):
            expected += [f"{percent(record[f'{split}_acc'])} {interval(record[f'{split}_acc_ci'], percent)}",
                         f"{mcc(record[f'{split}_mcc'])} {interval(record[f'{split}_mcc_ci'], mcc)}",
                         percent(record[f"baseline_{split}_acc"])]
        expected.append(f"ECE (15 bins) {record['calibration']['ece']:.3f}; after temperature scaling "
                        f"{record['calibration']['ece_scaled']:.3f}")
    teacher = distil["comparison"]["rows"][0]
    expected += [f"{percent(teacher['dev']['acc'])} {interval(teacher['dev']['acc_ci'], percent)}",
                 *(f"McNemar's p = {t['p']:.3g}" for t in distil["comparison"]["mcnemar"])]
    md, html_text = both(runs)
    assert [e for e in expected if e not in md] == []
    assert [e for e in expected if e not in html_text] == []


def test_each_sweep_summary_is_in_the_report(runs):
    summary = (runs / "tuning" / "rates.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| lr=0.002"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    for text in both(runs):
        assert "Sweep" in text and "rates" in text and all(cell in text for cell in cells)


def test_a_run_still_training_is_listed_but_never_reported_as_a_result(runs):
    rnns = records(runs, "rnn")
    finished = [r for r in rnns if r.finished]
    stopped, = [r for r in rnns if not r.finished]
    for text in both(runs):
        shown = text.split("Runs not finished")[0] + text.split("Where the numbers come from")[-1]
        assert stopped["run_id"] not in shown  # neither among the results nor in where the numbers come from
        listed = text.split("Runs not finished")[1].split("Sweeps")[0]
        assert stopped["run_id"] in listed and "1 of 2 epochs" in listed and "not a result" in listed
        assert finished[-1]["run_id"] in shown and finished[0]["run_id"] not in shown  # the latest finished one


def test_run_pins_a_run_and_refuses_an_unfinished_one(runs, tmp_path, monkeypatch, capfd):
    rnns = records(runs, "rnn")
    first, stopped = rnns[0]["run_id"], next(r for r in rnns if not r.finished)["run_id"]
    done = run_main("report", "--runs", runs, "--out", tmp_path / "pinned", "--run", first, cwd=tmp_path,
                    monkeypatch=monkeypatch, capfd=capfd)
    assert done.returncode == 0
    md = (tmp_path / "pinned" / "report.md").read_text()
    assert f"rnn: CoLA (run `{first}`)" in md and f"rnn: CoLA (run `{rnns[1]['run_id']}`)" not in md
    refused = run_main("report", "--runs", runs, "--out", tmp_path / "x", "--run", stopped, cwd=tmp_path,
                       monkeypatch=monkeypatch, capfd=capfd)
    assert refused.returncode == 1 and "has not finished" in refused.stderr and "Traceback" not in refused.stderr
    unknown = run_main("report", "--runs", runs, "--out", tmp_path / "x", "--run", "nosuchid", cwd=tmp_path,
                       monkeypatch=monkeypatch, capfd=capfd)
    assert unknown.returncode == 1 and "nosuchid" in unknown.stderr


def test_select_best_shows_the_best_dev_score(runs, tmp_path, monkeypatch, capfd):
    finished = [r for r in records(runs, "rnn") if r.finished]
    best = max(finished, key=lambda r: r["dev_acc"])
    assert run_main("report", "--runs", runs, "--out", tmp_path, "--select", "best", cwd=tmp_path,
                    monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    assert f"rnn: CoLA (run `{best['run_id']}`)" in (tmp_path / "report.md").read_text()


def test_the_html_is_one_file_that_needs_nothing_else_and_embeds_every_plot(runs):
    page = (runs / "report" / "report.html").read_text(encoding="utf-8")
    parsed = HTMLText(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    assert parsed.urls == [] and not re.search(r"https?://|url\(", page)
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in parsed.images}
    plots = {p.name: p.read_bytes() for p in (runs / "plots").glob("*.png")}
    assert plots and [name for name, data in plots.items() if data not in embedded] == []
    assert 'name="viewport"' in page and "max-width" in page and "@media print" in page and "break-before: page" in page


def test_the_markdown_links_every_plot_relatively(runs):
    md = (runs / "report" / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert links and all(not Path(link).is_absolute() and (runs / "report" / link).is_file() for link in links)
    plots = {p.resolve() for p in (runs / "plots").glob("*.png")}
    assert {(runs / "report" / link).resolve() for link in links} == plots


def test_bad_input_is_named_and_the_output_folder_keeps_its_files(runs, tmp_path, monkeypatch, capfd):
    md, html_text = both(runs)
    for text in (md, html_text):
        assert re.search(r"tuning/rnn\.jsonl:\d+`?: not a JSON record, skipped", text)
    assert (runs / "report" / "notes.txt").read_text() == "mine\n"
    copy = shutil.copytree(runs, tmp_path / "runs", ignore=shutil.ignore_patterns("models"))
    (copy / "plots" / "summary.png").unlink()
    assert run_main("report", cwd=copy, monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    md, html_text = both(copy)
    assert "(image missing: `plots/summary.png` is gone)" in md
    assert "(image missing: plots/summary.png is gone)" in html_text


def test_a_section_with_no_run_says_so_and_what_makes_one(tmp_path, monkeypatch, capfd):
    assert run_main("report", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    md = (tmp_path / "report" / "report.md").read_text()
    for mode in ("gen", "LoRA", "distil", "tune"):
        assert re.search(rf"No finished `{mode}` run yet: `python run.py {mode}[^`]*` makes one", md), mode


def test_gen_no_record_leaves_no_record(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    argv = ["gen", "--gpt_variant", tiny_gpt_dir, "--max_new_tokens", "3"]
    assert run_main(*argv, "--no_record", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    assert not (tmp_path / "tuning" / "gen.jsonl").exists()
    printed = run_main(*argv, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).stdout
    record, = records(tmp_path, "gen")
    assert printed.strip() == (record["prompt"] + record["samples"][0]).strip() and record["tokens_per_s"] > 0


def test_the_model_card_gives_back_the_runs_dev_scores_and_survives_export(runs):
    from huggingface_hub import ModelCard
    lora, = records(runs, "LoRA")
    for folder, library in (("lora", "peft"), ("merged", "transformers")):
        card = ModelCard.load(runs / "models" / folder / "README.md")
        scores = {r.metric_type: r.metric_value for r in card.data.eval_results}
        assert scores == {"accuracy": lora["dev_acc"], "matthews_correlation": lora["dev_mcc"]}, folder
        assert card.data.library_name == library and card.data.pipeline_tag == "text-classification"
        assert CARD_MARKER in card.text and "Number of trainable parameters" in card.text
    assert "GPT2ForSequenceClassification.from_pretrained(" in ModelCard.load(
        runs / "models" / "merged" / "README.md").text
    distil, = records(runs, "distil")
    student = ModelCard.load(runs / "models" / "distil" / "README.md")
    assert {r.metric_type: r.metric_value for r in student.data.eval_results}["accuracy"] == distil["dev_acc"]


def test_legacy_records_are_reported_with_what_they_hold(tmp_path, monkeypatch, capfd):
    legacy = ROOT / "tests" / "fixtures" / "legacy_runs"  # schema 1 and 2 lines without ids, commits or commands
    assert run_main("report", "--runs", legacy, "--out", tmp_path, cwd=tmp_path, monkeypatch=monkeypatch,
                    capfd=capfd).returncode == 0
    md = (tmp_path / "report.md").read_text()
    rnn = next(r for r in records(legacy, "rnn") if r.finished)
    assert f"{percent(rnn['dev_acc'])} {interval(rnn['dev_acc_ci'], percent)}" in md
    assert "| commit | not recorded |" in md and "python run.py rnn" in md
    assert re.search(r"rnn: CoLA \(run `[0-9a-f]{12}`\)", md)
