"""How the report and the model card write a number, in one place: both writers (Markdown and HTML) and the card
call `formatted`, so a number reads the same wherever it appears."""

FORMATS = {
    "percent": lambda v: f"{100 * v:.1f}%",  # accuracies
    "mcc": lambda v: f"{v:+.3f}",
    "ece": lambda v: f"{v:.3f}",
    "p": lambda v: f"{v:.3g}",  # McNemar's p
    "perplexity": lambda v: f"{v:.2f}",
    "score": lambda v: f"{v:.2f}",  # BLEU, ROUGE-L
    "temperature": lambda v: f"{v:.2f}",
    "millions": lambda v: f"{v / 1e6:.2f}M",  # parameters
    "rate": lambda v: f"{v:,.0f}",  # tokens or sentences per second
    "seconds": lambda v: f"{v:.1f} s",
    "count": lambda v: f"{v:,}",
}


def formatted(value, kind):
    """`value` written as a `kind` of number (FORMATS); an interval (a pair) as [low, high]; None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(formatted(v, kind) for v in value) + "]"
    return FORMATS[kind](value)


def with_interval(value, interval, kind):
    """'68.5% [64.4%, 72.3%]': a score and its 95% interval."""
    return formatted(value, kind) if interval is None else f"{formatted(value, kind)} {formatted(interval, kind)}"
