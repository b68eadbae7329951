"""What bench.py's training rows share: CoLA sentences to time on, and the Hugging Face peer's side (transformers +
PEFT's LoRA classifier, and the usual padded training epoch)."""
import torch

from model import EOT
from textdata.batches import Split, collate
from textdata.readers import encode, get_tokenizer, load_cola


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cola_sample(data_dir, n):
    """CoLA's training sentences, and a seeded random `n` of them tokenized with their labels."""
    sentences, labels = load_cola(data_dir)["train"]
    keep = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0))[:n].tolist()
    return sentences, Split(encode(get_tokenizer(), [sentences[i] for i in keep]),
                            torch.tensor([labels[i] for i in keep]))


def hf_peft_classifier(config):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification
    hf = GPT2ForSequenceClassification(GPT2Config(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                                  pad_token_id=EOT, num_labels=2))
    return get_peft_model(hf, LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"],
                                         fan_in_fan_out=True, task_type="SEQ_CLS",
                                         modules_to_save=["ln_1", "ln_2", "ln_f", "score"]))


def shuffled_batches(n, batch_size, seed):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def peer_epoch(model, optimizer, split, batches, dtype=torch.float32, device=torch.device("cpu")):
    """The usual recipe: batches padded to the batch maximum, attention mask, Adam; fp32 or `dtype` autocast."""
    model.train()
    for index in batches:
        ids, lengths, labels, _ = collate(split, index, device)
        mask = (torch.arange(ids.size(1), device=device) < lengths[:, None]).long()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
