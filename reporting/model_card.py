"""The model card (README.md) of a folder the project saves: huggingface_hub's ModelCard, whose YAML the Hub reads
(base model, library, pipeline, datasets, tags, the dev scores as model-index results) and whose body holds the
parameter table, the hyper-parameters, where the numbers come from and how to load the model."""
from pathlib import Path

from reporting.document import Code, Document, Paragraph, Section, block_markdown, to_markdown
from reporting.run_blocks import (hyperparameter_table, is_lm, local_path, parameter_table,
                                  provenance_blocks, results_blocks, split_titles)
from training.checkpoints import CARD_MARKER, CARD_NAME, card_text_of_ours
from training.run_watch import lora_method

HOW_TO_LOAD = "How to load"


def hub_dataset(spec):
    """(dataset id on the Hub, its configuration) of a run's data (CoLA's raw files are GLUE's CoLA), or None for
    local files."""
    if spec.is_cola:
        return "nyu-mll/glue", "cola"
    return (None, None) if local_path(spec.dataset) else (spec.dataset, spec.dataset_config)


def eval_results(record):
    """The dev scores as model-index results: accuracy and Matthews correlation for a classifier, perplexity for a
    language model."""
    from huggingface_hub import EvalResult
    spec = record.config.data
    dataset_id, dataset_config = hub_dataset(spec)
    task = "text-generation" if is_lm(record) else "text-classification"
    metrics = ((("perplexity", "dev_perplexity", "perplexity"),) if is_lm(record) else
               (("accuracy", "dev_acc", "accuracy"), ("matthews_correlation", "dev_mcc", "MCC")))
    split = spec.eval_split or ("validation" if spec.is_cola else None)
    return [EvalResult(task_type=task, dataset_type=dataset_id or spec.name, dataset_name=spec.name,
                       dataset_config=dataset_config, dataset_split=split, metric_type=metric,
                       metric_value=record[key], metric_name=f"{split_titles(record)['dev']} {name}")
            for metric, key, name in metrics]


LIBRARY = {"lora": "peft", "full": "transformers", "head": None}


def card_data(record, model_name):
    from huggingface_hub import ModelCardData
    config, trained = record.config, lora_method(record.config)
    variant = config.model.gpt_variant if trained else None
    dataset_id, _ = hub_dataset(config.data)
    tags = ([{"lora": "lora", "head": "linear-probe", "full": "fine-tuned"}[trained], "gpt2",
             "causal-lm" if is_lm(record) else "text-classification"] if trained else
            ["rnn", "text-classification", *(["knowledge-distillation"] if config.MODE == "distil" else [])])
    return ModelCardData(model_name=model_name, base_model=None if local_path(variant) else variant,
                         library_name=LIBRARY[trained] if trained else None,
                         pipeline_tag="text-generation" if is_lm(record) else "text-classification",
                         datasets=[dataset_id] if dataset_id else None, tags=sorted(tags),
                         eval_results=eval_results(record))


def what_it_is(record):
    config, trained = record.config, lora_method(record.config)
    kind = "language model (GPT2LMHeadModel)" if is_lm(record) else "classifier (GPT2ForSequenceClassification)"
    if trained == "lora":
        return (f"A LoRA adapter in PEFT's format (rank {config.lora.LoRA_rank}, alpha {config.lora.lora_alpha:g}, "
                f"on {', '.join(config.lora.lora_targets)}) of `{config.model.gpt_variant}` as a {kind}, trained on "
                f"{config.data.name} by `run.py LoRA`.")
    if trained == "full":
        return (f"Every weight of `{config.model.gpt_variant}` as a {kind}, fine-tuned on {config.data.name} by "
                "`run.py LoRA --method full`: a transformers checkpoint.")
    if trained == "head":
        return (f"The classification head and the LayerNorms of `{config.model.gpt_variant}` (`head_model.safetensors`"
                f", transformers' names), trained on {config.data.name} over the frozen rest by `run.py LoRA --method "
                "head`: load them onto that base with this project.")
    s = config.student
    taught = f", taught by the LoRA-tuned GPT-2 in `{config.model_path}`" if config.MODE == "distil" else ""
    return (f"A DistilRNN student ({s.rnn_layers} {s.rnn_cell.upper()} layers of {s.rnn_hidden}) trained on "
            f"{config.data.name} by `run.py {config.MODE}`{taught}.")


def how_to_load(record, folder):
    trained, predict = lora_method(record.config), \
        Code(f"python run.py predict --model_path {folder} --sentence \"The book was written by John.\"")
    if trained in (None, "head"):
        return [Paragraph("With this project (it reads the folder's config and safetensors):"), predict]
    task = "GPT2LMHeadModel" if is_lm(record) else "GPT2ForSequenceClassification"
    ours = Code(f"python run.py gen --adapter {folder} --prompt \"...\"") if is_lm(record) else predict
    if trained == "full":
        if is_lm(record):
            ours = Code(f"python run.py gen --gpt_variant {folder} --prompt \"...\"")
        return [Code(f"from transformers import {task}\nmodel = {task}.from_pretrained({folder!r})"),
                Paragraph("or with this project:"), ours]
    base = record.config.model.gpt_variant
    labels = "" if is_lm(record) else \
        f", num_labels={len(record.get('dev_probs')[0]) if record.get('dev_probs') else 2}"
    return [Code(f"from peft import PeftModel\nfrom transformers import {task}\n"
                 f"base = {task}.from_pretrained({base!r}{labels})\n"
                 f"model = PeftModel.from_pretrained(base, {folder!r})"),
            Paragraph("or with this project:"), ours]


def card_document(record, run_id, folder):
    return Document(Path(folder).name, (Paragraph(CARD_MARKER), Paragraph(what_it_is(record))), (
        Section("Results", tuple(results_blocks(record))),
        Section("Parameters", (parameter_table(record),)),
        Section("Hyper-parameters", (hyperparameter_table(record),)),
        Section("Where the numbers come from", tuple(provenance_blocks(record, run_id))),
        Section(HOW_TO_LOAD, tuple(how_to_load(record, folder)))))


def card_text(document, data):
    """The card's text: the YAML header, then the body."""
    from huggingface_hub import ModelCard
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{to_markdown(document, '.')}"))


def model_card(record, run_id, folder):
    """The README.md of the folder a training run saved its model to, from the run's record (a RunRecord)."""
    return card_text(card_document(record, run_id, str(folder)), card_data(record, Path(folder).name))


def exported_card(adapter_folder, out, command):
    """The card of `export`'s merged model: the adapter's card (its scores, tables and provenance; when the adapter
    has none of ours, only what its config says), the library transformers, and how to load the merged model."""
    from huggingface_hub import ModelCard, ModelCardData
    ours = card_text_of_ours(Path(adapter_folder) / CARD_NAME)
    card = ModelCard(ours) if ours else None
    data = card.data if card else ModelCardData(model_name=Path(out).name)
    data.library_name, data.model_name = "transformers", Path(out).name
    body = card.text.split(f"## {HOW_TO_LOAD}")[0].strip().replace(f"# {Path(adapter_folder).name}",
                                                                   f"# {Path(out).name}", 1) if card else (
        f"# {Path(out).name}\n\n{CARD_MARKER}\n\nThe adapter in `{adapter_folder}` carried no card of this project's: "
        "no scores are recorded here.")
    task = "GPT2LMHeadModel" if data.pipeline_tag == "text-generation" else "GPT2ForSequenceClassification"
    load = [Paragraph(f"The adapter of `{adapter_folder}` merged into its base by `{command}`: a plain transformers "
                      "checkpoint."),
            Code(f"from transformers import {task}\nmodel = {task}.from_pretrained({str(out)!r})")]
    load = "\n\n".join([f"## {HOW_TO_LOAD}", *(block_markdown(b, ".") for b in load)])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n\n{load}"))
