"""The sections of a run's configuration, one frozen dataclass per concern, each field declaring its flag once
(config.fields.flag). A subcommand's configuration (config.subcommands) composes them. The data a run reads is
textdata.readers.DataSpec, a section of the same kind."""
from dataclasses import dataclass, replace

from config.fields import RESUMABLE, flag
from model import LORA_TARGETS
from utils import (UsageError, fraction, non_negative_float, non_negative_int, number_in, positive_float, positive_int,
                   seed_int)

DTYPES = ["auto", "float32", "bfloat16", "float16"]
TOP_K = 50
KD_TEMPERATURE = 2.0
TRANSFER_RATES = {"p_mask": 0.1, "p_replace": 0.1, "p_ngram": 0.25}  # --augment's defaults


@dataclass(frozen=True)
class RunOptions:
    """Where a run computes and what it leaves beside its result. Of these only the dtype and the seed decide the
    result."""
    debug: bool = flag(False, "show full tracebacks", switch=True, decides=False)
    device: str = flag("auto", "auto (CUDA, else an Apple GPU, else the CPU), cpu, cuda, cuda:N, mps", decides=False)
    dtype: str = flag("auto", "auto: bf16 where it is native (GPUs from A100 on, CPUs with AMX/AVX512-BF16), fp16 on "
                      "T4/V100, else fp32 (MPS: fp16, fp32 to train)", choices=DTYPES)
    compile: bool = flag(False, "torch.compile the model (gen: one graph per decode step, CUDA graphs on a GPU)",
                         switch=True, decides=False)
    seed: int = flag(0, "seeds weights, data order, dropout and sampling (the assignment's form, a number right after "
                     "the subcommand, means the same)", type=seed_int)
    resume: bool = flag(False, "continue the interrupted run with these flags", switch=True, decides=False)
    tensorboard: str = flag(None, "log steps and epochs for TensorBoard in DIR (given alone: "
                            "runs/<mode>-<time>-<pid>)", nargs="?", const="auto", metavar="DIR", decides=False)


@dataclass(frozen=True)
class ModelSource:
    """Which GPT-2 a run builds: a variant's pretrained weights or its architecture with random ones, held as they
    are or as int8 linears."""
    gpt_variant: str = flag(None, "gpt2, gpt2-medium, gpt2-large, gpt2-xl, any Hugging Face GPT-2 id, or a local "
                            "folder in transformers' format (default: gpt2; where an adapter is read, the base it "
                            "names)")
    random_init: bool = flag(False, "the variant's architecture with random weights", switch=True)
    quantize: str = flag(None, "int8 weights (one scale per output channel) for the blocks and the head: a quarter of "
                         "fp32's bytes to read per token in gen, about half the memory in predict (slower than fp32 "
                         "for large batches there; errors: see docs/decoding.md)", choices=["int8"])


@dataclass(frozen=True)
class TrainSettings:
    """How the one training loop trains: Adam at `lr` for `epochs` over batches of `batch_size` sentences (or text
    blocks), each cut into micro-batches of at most `micro_batch_tokens` padded tokens, gradients clipped to norm
    `clip`, on a seeded subset of `max_examples` training examples."""
    epochs: int = flag(10, "0 prints the parameter table only", type=non_negative_int, decides=RESUMABLE)
    batch_size: int = flag(None, "sentences (or text blocks) per optimizer step (default: 128; LoRA --task lm: 8)",
                           type=positive_int)
    lr: float = flag(None, "Adam learning rate (default: 1e-3; LoRA --task lm: 2e-4)", type=positive_float)
    max_examples: int = flag(None, "train on a seeded random subset of this size", type=positive_int)
    micro_batch_tokens: int = flag(None, "split each batch into pieces of at most this many padded tokens and "
                                   "accumulate gradients: bounds memory, same result (default: 512 on CPU, as fast as "
                                   "larger pieces there; on CUDA what half the free memory holds)", type=positive_int,
                                   decides=False)
    clip: float = flag(None, "gradient-norm clipping, 0 for none (ReLU RNNs explode without it)",
                       type=non_negative_float)
    grad_checkpoint: bool = flag(False, "recompute each GPT-2 block's activations in the backward pass instead of "
                                 "keeping them: less memory (larger default micro-batches on CUDA), one more forward "
                                 "pass per block and step, the same gradients", switch=True, decides=False)

    def with_defaults(self, **defaults):
        """This section with each field named in `defaults` that was not given (None) set to its default."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass(frozen=True)
class LoRASettings:
    """The low-rank update of each adapted linear layer, y = W x + (alpha / r) B A x, and what it is trained for."""
    LoRA_rank: int = flag(4, "rank r of the update B A", names=["--lora_rank"], type=positive_int)
    lora_alpha: float = flag(None, "scale numerator (default: the rank, i.e. scale 1)", type=positive_float)
    lora_dropout: float = flag(0.0, "dropout on the LoRA branch's input", type=number_in(float, 0, 1, high_open=True))
    lora_targets: tuple = flag(list(LORA_TARGETS), "the linear layers of each block that get LoRA", nargs="+",
                               choices=LORA_TARGETS)
    task: str = flag("classify", "classify: a score head on the last token, trained on labels; lm: GPT-2's own "
                     "next-token loss on text blocks or on prompt -> completion pairs (a CAUSAL_LM adapter for `gen "
                     "--adapter`)", choices=["classify", "lm"])
    method: str = flag("lora", "what trains: lora the LoRA matrices, every LayerNorm (ln_1, ln_2, ln_f) and the score "
                       "head (saved as a PEFT adapter); head the score head and those LayerNorms alone, the rest "
                       "frozen (--task classify; saved as the head with its base's name); full every weight (saved as "
                       "a plain transformers checkpoint)", choices=["lora", "head", "full"])
    use_rslora: bool = flag(False, "rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (PEFT's "
                            "use_rslora)", switch=True)
    use_dora: bool = flag(False, "DoRA: learn a magnitude per output feature and normalise W + s B A per output "
                          "feature (PEFT's use_dora)", switch=True)

    def validate(self):
        twice = next((t for i, t in enumerate(self.lora_targets) if t in self.lora_targets[:i]), None)
        if twice:
            raise UsageError(f"--lora_targets: {twice} is given twice")
        variant = next((f for f in ("use_rslora", "use_dora") if getattr(self, f)), None)
        if variant and self.method != "lora":
            raise UsageError(f"--{variant} is a variant of LoRA: it does not apply to --method {self.method}")
        if self.method == "head" and self.task == "lm":
            raise UsageError("--method head trains a classifier's score head; a language model's head is its token "
                             "embedding (tied): use --method lora or full with --task lm")


@dataclass(frozen=True)
class PairColumns:
    """Prompt -> completion pairs: the columns of a dataset that hold them."""
    prompt_column: str = flag(None, "the prompts' column of prompt -> completion pairs (LoRA --task lm: its tokens are "
                              "inputs, never targets; gen --dataset: what is decoded)")
    completion_column: str = flag(None, "the completions' column of the pairs (LoRA --task lm: the targets; gen "
                                  "--dataset: the references)")


@dataclass(frozen=True)
class LMSettings:
    """LoRA --task lm: the block the text is cut into, and the decoding that scores a pair-trained adapter."""
    block_size: int = flag(None, "--task lm: tokens per text block, and the longest prompt + completion kept "
                           "(default: 256, or the model's context if shorter)", type=positive_int)
    generate_eval: int = flag(0, "--task lm on pairs: after training, decode every validation prompt greedily (up to "
                              "this many new tokens) with the adapter and with its base, and score BLEU and ROUGE-L as "
                              "`gen --dataset` does (0: do not)", type=non_negative_int, metavar="MAX_NEW_TOKENS",
                              decides=False)


@dataclass(frozen=True)
class StudentSettings:
    """The DistilRNN student's shape."""
    rnn_hidden: int = flag(768, "student embedding and hidden size", type=positive_int)
    rnn_layers: int = flag(2, "stacked recurrent layers", type=positive_int)
    rnn_cell: str = flag("rnn", "recurrent cell", choices=["rnn", "gru", "lstm"])


@dataclass(frozen=True)
class DistilSettings:
    """The KD loss: alpha * soft + (1 - alpha) * CE on labelled sentences, the soft term alone on transfer ones."""
    temperature: float = flag(None, f"--kd_loss kl: softmax temperature T of the KD loss (default: {KD_TEMPERATURE})",
                              type=positive_float)
    alpha: float = flag(0.5, "weight of the soft (KL) part; 1-alpha on labels", type=fraction)
    kd_loss: str = flag("kl", "the soft term: Hinton's KL at --temperature, or Tang et al.'s squared distance between "
                        "the logits (no temperature)", choices=["kl", "mse"])

    def validate(self):
        if self.kd_loss == "mse" and self.temperature is not None:
            raise UsageError(f"--temperature {self.temperature} is the KL loss' temperature: --kd_loss mse compares "
                             "the logits themselves, it would be ignored")


@dataclass(frozen=True)
class TransferSettings:
    """The transfer set: sentences beyond the training set that the teacher alone labels."""
    augment: int = flag(0, "add this many sentences per training sentence, made by Tang et al.'s rules, to the "
                        "transfer set the teacher labels", type=non_negative_int)
    p_mask: float = flag(None, f"--augment: chance a word is masked (as ___) (default: {TRANSFER_RATES['p_mask']})",
                         type=fraction)
    p_replace: float = flag(None, "--augment: chance a word not masked is replaced by a draw from the training "
                            f"corpus' unigram distribution (default: {TRANSFER_RATES['p_replace']})", type=fraction)
    p_ngram: float = flag(None, "--augment: chance a sentence is then cut to a random n-gram, n in 1..5 (default: "
                          f"{TRANSFER_RATES['p_ngram']})", type=fraction)
    transfer_gen: int = flag(0, "add this many sentences sampled from the teacher's GPT-2 base, prompted with 1-3 first "
                             "words of training sentences, to the transfer set", type=non_negative_int)

    @property
    def wanted(self):
        return bool(self.augment or self.transfer_gen)

    def with_rates(self):
        """This section with each --augment rate not given set to its default (augmentation uses them all)."""
        return replace(self, **{k: v for k, v in TRANSFER_RATES.items() if getattr(self, k) is None})

    def validate(self):
        given = next((f for f in TRANSFER_RATES if getattr(self, f) is not None), None)
        if given and not self.augment:
            raise UsageError(f"--{given} {getattr(self, given)} is a rate of --augment's rules: give --augment N "
                             "too (without it no sentence is augmented)")


@dataclass(frozen=True)
class DecodeSettings:
    """How gen picks each next token: transformers' order (repetition penalty, temperature, top-k, top-p), or beam
    search with transformers' semantics."""
    max_new_tokens: int = flag(100, "tokens to generate per sample", type=positive_int)
    temperature: float = flag(None, "0 means greedy (default: 1)", type=non_negative_float)
    top_k: int = flag(None, "sample among the k most likely tokens (default: 50)", type=positive_int)
    top_p: float = flag(None, "nucleus sampling: keep the most likely tokens up to this probability mass",
                        type=number_in(float, 0, 1, low_open=True))
    repetition_penalty: float = flag(1.0, "CTRL's penalty; 1 is none", type=positive_float)
    greedy: bool = flag(False, "always the most likely token", switch=True)
    ignore_eos: bool = flag(False, "keep going past <|endoftext|>", switch=True)
    no_repeat_ngram_size: int = flag(0, "never let an n-gram of this size occur twice in prompt + output (0: no ban)",
                                     type=non_negative_int)
    num_beams: int = flag(1, "beam search with this many beams (transformers' semantics); 1: sample or --greedy",
                          type=positive_int)
    length_penalty: float = flag(None, "beam search: a hypothesis scores its log-probability / length ** this; > 0 "
                                 "favours longer ones (default: 1)", type=number_in(float))
    early_stopping: str = flag(None, "beam search: true stops once num_beams hypotheses end, false (default) when none "
                               "can still win by transformers' estimate, never when none can win at the longest "
                               "length", nargs="?", const="true", choices=["true", "false", "never"])

    @property
    def sampling_temperature(self):
        return 0.0 if self.greedy else 1.0 if self.temperature is None else self.temperature

    @property
    def sampling_top_k(self):
        return TOP_K if self.top_k is None else self.top_k

    @property
    def stop_at_eos(self):
        return not self.ignore_eos

    def validate(self, num_samples=1):
        """--greedy and beams pick the most likely tokens, so no sampling flag applies; beam flags need beams."""
        sampling_flags = ("temperature", "top_k", "top_p")
        ignored = [f for f in sampling_flags if self.greedy and getattr(self, f) is not None]
        if ignored:
            raise UsageError(f"--greedy takes the most likely token: --{ignored[0]} would be ignored")
        beam_only = [f for f in ("length_penalty", "early_stopping") if getattr(self, f) is not None]
        if self.num_beams == 1 and beam_only:
            raise UsageError(f"--{beam_only[0]} is a beam-search setting: give --num_beams 2 or more")
        sampling = [f for f in sampling_flags if getattr(self, f) is not None]
        if self.num_beams > 1 and (sampling or num_samples > 1):
            what = f"--{sampling[0]}" if sampling else "--num_samples"
            raise UsageError(f"--num_beams {self.num_beams} returns the most likely hypothesis: {what} would be "
                             "ignored")
        if self.sampling_temperature == 0 and num_samples > 1:
            what = "--greedy" if self.greedy else "--temperature 0"
            raise UsageError(f"{what} decodes the same tokens from every seed: --num_samples {num_samples} would "
                             "print one sample that many times")
