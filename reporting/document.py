"""A report as a neutral document (sections of headings, paragraphs, tables, code, lists and images), rendered to
Markdown (relative image links, for GitHub) and to one self-contained HTML file (images embedded as data URIs, an
inline stylesheet, no script, nothing fetched)."""
import base64
from dataclasses import dataclass
import html
import os
from pathlib import Path
import re
from urllib.parse import quote


@dataclass(frozen=True)
class Heading:
    text: str


@dataclass(frozen=True)
class Paragraph:
    """Text; `code` between backticks is shown as code."""
    text: str


@dataclass(frozen=True)
class Code:
    """Text shown as it is: a command, a prompt, a sample."""
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple
    rows: tuple


@dataclass(frozen=True)
class Items:
    """A bulleted list of texts (each a Paragraph's text)."""
    items: tuple


@dataclass(frozen=True)
class Image:
    """A picture on disk; one that is gone is named in its place."""
    path: str
    caption: str


@dataclass(frozen=True)
class Section:
    """A part of the document under its title (a page of its own when printed)."""
    title: str
    blocks: tuple


@dataclass(frozen=True)
class Document:
    title: str
    intro: tuple
    sections: tuple


def missing_image(image):
    return Paragraph(f"(image missing: `{image.path}` is gone)")


# Markdown

def markdown_cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def fence(text):
    """A code fence longer than any run of backticks in `text`."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def block_markdown(block, out_dir):
    if isinstance(block, Heading):
        return f"### {block.text}"
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Code):
        return f"{fence(block.text)}\n{block.text}\n{fence(block.text)}"
    if isinstance(block, Table):
        lines = ["| " + " | ".join(markdown_cell(h) for h in block.headers) + " |",
                 "|" + "---|" * len(block.headers)]
        return "\n".join(lines + ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in block.rows])
    if isinstance(block, Items):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Image):
        if not Path(block.path).is_file():
            return block_markdown(missing_image(block), out_dir)
        link = quote(Path(os.path.relpath(Path(block.path).resolve(), Path(out_dir).resolve())).as_posix())
        return f"![{block.caption}]({link})"
    raise TypeError(f"not a block: {block!r}")


def to_markdown(document, out_dir):
    """The document in Markdown, its images linked relative to `out_dir` (where the file goes)."""
    parts = [f"# {document.title}", *(block_markdown(b, out_dir) for b in document.intro)]
    for section in document.sections:
        parts += [f"## {section.title}", *(block_markdown(b, out_dir) for b in section.blocks)]
    return "\n\n".join(parts) + "\n"


# HTML

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.5; color: #222; margin: 0; }
main { max-width: 52rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05rem; }
table { border-collapse: collapse; display: block; overflow-x: auto; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
td:first-child { white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
pre { background: #f4f4f4; padding: 0.5rem; overflow-x: auto; white-space: pre-wrap; word-break: break-word; }
code { background: #f4f4f4; padding: 0 0.2rem; word-break: break-word; }
img { max-width: 100%; height: auto; display: block; }
figure { margin: 0.5rem 0; } figcaption { font-size: 0.85rem; color: #555; }
@media print {
  main { max-width: none; }
  section { break-before: page; page-break-before: always; }
  table, figure, pre { break-inside: avoid; page-break-inside: avoid; }
}
"""


def inline_html(text):
    """Escaped text, `code` spans as <code>."""
    parts = re.split(r"`([^`]*)`", str(text))
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(parts))


def data_uri(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def block_html(block):
    if isinstance(block, Heading):
        return f"<h3>{inline_html(block.text)}</h3>"
    if isinstance(block, Paragraph):
        return f"<p>{inline_html(block.text)}</p>"
    if isinstance(block, Code):
        return f"<pre>{html.escape(block.text)}</pre>"
    if isinstance(block, Table):
        head = "".join(f"<th>{inline_html(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f"<td>{inline_html(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Image):
        if not Path(block.path).is_file():
            return block_html(missing_image(block))
        caption = html.escape(block.caption)
        return (f'<figure><img src="{data_uri(block.path)}" alt="{caption}"><figcaption>{caption}</figcaption>'
                "</figure>")
    raise TypeError(f"not a block: {block!r}")


def to_html(document):
    """The document as one HTML file that needs nothing else: readable on a phone, a page per section in print."""
    sections = "".join(f"<section><h2>{inline_html(s.title)}</h2>{''.join(block_html(b) for b in s.blocks)}"
                       "</section>" for s in document.sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(document.title)}</title><style>{STYLE}</style></head>\n<body><main>"
            f"<h1>{html.escape(document.title)}</h1>{''.join(block_html(b) for b in document.intro)}{sections}"
            "</main></body></html>\n")
