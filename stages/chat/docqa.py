"""Closed-book question/answer pairs about the modules, functions and classes a pydoc page documents.

The default corpus is the standard-library documentation rendered by pydoc. A `docs` row of it is
either pydoc's plain text (`pydoc.render_doc(module, renderer=pydoc.plaintext)`: NAME, DESCRIPTION,
CLASSES, FUNCTIONS sections with indented entries) or what an HTML extractor keeps of pydoc's HTML
page: the same sections as table rows, "| Functions |  |  |", with a whole section's entries on one
line ("dumps(obj, *, ...) Serialize ``obj`` to a JSON formatted ``str``. ... loads(s, ...) ...").
`parse_pydoc` reads both the same way: split the text into sections at their header lines, find the
entries of the FUNCTIONS and CLASSES sections (a name and a balanced argument list at a line start
or after the end of the previous entry's text), and keep the first sentence of each entry's text.

`questions` turns the entries of a whole corpus into question/answer pairs:

    module     "What is the json module for?"            -> its first sentence
    function   "What does json.dumps do?"                -> the function's first sentence
    signature  "What is the signature of json.dumps?"    -> "json.dumps(obj, *, skipkeys=False, ...)"
    class      "What is json.JSONDecoder?"               -> the class's first sentence
    where      "Which module provides dumps?"            -> "json" (names defined by one module only;
                                                            these have an exact answer and a verifier)
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal

SECTIONS = frozenset({"NAME", "DESCRIPTION", "MODULE REFERENCE", "MODULE DOCS", "PACKAGE CONTENTS", "SUBMODULES",
                      "MODULES", "CLASSES", "FUNCTIONS", "DATA", "VERSION", "DATE", "AUTHOR", "CREDITS", "FILE"})
HTML_SECTIONS = frozenset({"Modules", "Package Contents", "Classes", "Functions", "Data", "Author", "Credits"})
TITLE = re.compile(r"^Python:\s+(?:built-in\s+)?(?:module|package)\s+([\w.]+)")
PAGE_ROW = re.compile(r"\s*\|\s*[\w.]+(?: \(version [^)]*\))?\s*\|\s*index\b")  # "| json (version 2.0.9) | index /usr/..."
RETURNS = re.compile(r"^\s*->\s*\S+")  # a return annotation after the signature: "(obj: ~T, /) -> ~T"
ALIAS = re.compile(r"\s*\b\w+ =$")
URL_PAGE = re.compile(r"/([A-Za-z_][\w.]*)\.html$")
ENTRY = re.compile(r"(?<![\w.])([A-Za-z_]\w*)\(")
CLASS = re.compile(r"(?<![\w.])class ([A-Za-z_]\w*)(?=\()")
# where an entry's own text ends and pydoc's listing of its members begins
BOILERPLATE = re.compile(r"\b(Method resolution order:|Methods defined here:|Data descriptors defined here:|Data and other "
                         r"attributes defined here:|Class methods defined here:|Static methods defined here:|Readonly "
                         r"properties defined here:|Methods inherited from|Data descriptors inherited from|Data and other "
                         r"attributes inherited from|Class methods inherited from|Static methods inherited from|See "
                         r"help\(type\(self\)\) for accurate signature)")
ABBREVIATIONS = frozenset({"e.g.", "i.e.", "a.k.a.", "etc.", "vs.", "cf.", "approx.", "no.", "resp."})
SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
MAX_SENTENCE_CHARS = 300
MAX_SIGNATURE_CHARS = 120


@dataclass(frozen=True)
class Entry:
    """One documented thing: `module` is "json", `name` is "dumps" ("" for the module itself)."""

    module: str
    kind: Literal["module", "function", "class"]
    name: str
    summary: str  # the first sentence of its documentation
    signature: str = ""  # the argument list without the name, "(obj, *, skipkeys=False)"


@dataclass(frozen=True)
class QA:
    qtype: Literal["module", "function", "signature", "class", "where"]
    question: str
    answer: str
    exact: bool  # the answer is short and exact: a verifier can grade it


def module_name(url: str, title: str, text: str) -> str | None:
    """The module a pydoc page documents, or None for any other page (the index, language topics, a
    web page). A pydoc page has pydoc's title ("Python: module json"), plain text's first line
    ("Python Library Documentation: module json") or an HTML title row ("| json | index /path ...");
    the name comes from its URL ("/os.path.html"), else from its title or NAME section."""
    by_title = TITLE.match(title or "")
    if not (by_title or text.startswith("Python Library Documentation:") or PAGE_ROW.match(text)):
        return None
    m = URL_PAGE.search(url or "")
    if m and m.group(1) != "index" and not m.group(1).startswith("topic-"):
        return m.group(1)
    if by_title:
        return by_title.group(1)
    m = re.search(r"^NAME\n\s+([\w.]+)", text, re.M)
    return m.group(1) if m else None


def sections(text: str) -> dict[str, str]:
    """Section name -> its text, with pydoc's " |  " margins and table pipes removed; the text before
    the first header is "HEAD" (an HTML page's title row and module docstring)."""
    out: dict[str, list[str]] = {"HEAD": []}
    current = "HEAD"
    for line in text.splitlines():
        bare = line.strip(" |\t")
        # plain text: "FUNCTIONS" at column 0; extracted HTML: a table row "| Functions |  |", not
        # indented (an indented " |  name" is a line of a class's documentation in plain text)
        plain_header = bare in SECTIONS and line.rstrip() == bare
        html_header = bare in HTML_SECTIONS and (line.startswith("|") or line.rstrip() == bare)
        if plain_header or html_header:
            current = bare.upper()
            out.setdefault(current, [])
        elif current == "HEAD" and (line.lstrip().startswith("|") or line.startswith("Python Library Documentation")):
            continue  # an HTML page's title row; plain text's first line
        else:
            out[current].append(bare)
    return {k: "\n".join(v) for k, v in out.items()}


def flat(text: str) -> str:
    return " ".join(text.split())


def first_sentence(text: str) -> str:
    """The first sentence of `text` (flattened), or "" when it does not look like prose."""
    text = flat(text)
    for m in SENTENCE_END.finditer(text):
        word = text[: m.end()].rsplit(" ", 1)[-1].lstrip("(").lower()
        if word in ABBREVIATIONS:
            continue
        text = text[: m.end()]
        break
    if len(text) > MAX_SENTENCE_CHARS or len(text.split()) < 2 or not text[0].isupper() or text.endswith(":"):
        return ""
    return text


def _close_paren(text: str, start: int) -> int:
    """Index just past the parenthesis that closes the one at text[start], or -1."""
    depth = 0
    for i in range(start, min(len(text), start + 2000)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _parameter_list(sig: str) -> bool:
    try:
        ast.parse(f"def f{sig}: pass")
    except SyntaxError:
        return False
    return True


def _starts_entry(text: str, pos: int, sig: str, end: int) -> bool:
    """Whether an entry starts at `pos`: at the start of a line, after the end of a sentence (a
    section flattened onto one line), or after a word when the argument list parses and a capital
    letter follows (the previous entry's text had no full stop). A call named in prose is none of these."""
    before = text[:pos].rstrip(" \t")
    if not before or before.endswith("\n") or before[-1] in ".!?:)":
        return True
    after = text[end:].lstrip()
    return text[pos - 1].isspace() and after[:1].isupper() and _parameter_list(sig)


def _entries(body: str, pattern: re.Pattern) -> list[tuple[str, str, str]]:
    """(name, signature, text) for each entry of a FUNCTIONS or CLASSES section."""
    found = []  # (start, name, signature, end of signature)
    for m in pattern.finditer(body):
        paren = m.end() - 1 if body[m.end() - 1] == "(" else m.end()
        end = _close_paren(body, paren)
        if end < 0 or not _starts_entry(body, m.start(), body[paren:end], end):
            continue
        found.append((m.start(), m.group(1), body[paren:end], end))
    out = []
    for i, (start, name, sig, end) in enumerate(found):
        stop = found[i + 1][0] if i + 1 < len(found) else len(body)
        out.append((name, sig, body[end:stop]))
    return out


def _doc_text(name: str, text: str) -> str:
    """An entry's own first paragraph: without a repeated "Name(signature)" line (classes) and
    without pydoc's member listings."""
    text = text.strip()
    if text.startswith(name + "("):
        end = _close_paren(text, len(name))
        text = text[end:].strip() if end > 0 else text
    text = flat(re.split(r"\n\s*\n", text, maxsplit=1)[0])  # plain text keeps paragraph breaks; use them
    cut = BOILERPLATE.search(text)
    text = text[: cut.start()].strip() if cut else text
    return ALIAS.sub("", text)  # "name = " of the next entry, an alias ("__iand__ = iand(a, b, /)")


def parse_pydoc(text: str, url: str = "", title: str = "") -> list[Entry]:
    """The module, public functions and public classes a pydoc page documents, each with the first
    sentence of its documentation; entries whose text is not prose are left out."""
    module = module_name(url, title, text)
    if module is None:
        return []
    parts = sections(text)
    entries: list[Entry] = []
    synopsis = re.match(r"[\w.]+ - (.+)", flat(parts.get("NAME", "")))
    if synopsis:
        summary = first_sentence(synopsis.group(1))
    elif "DESCRIPTION" in parts:
        summary = first_sentence(parts["DESCRIPTION"])
    else:  # an extracted HTML page: the title row (dropped by `sections`), then the module docstring
        summary = first_sentence(parts["HEAD"])
    if summary:
        entries.append(Entry(module, "module", "", summary))
    seen = set()
    for kind, section, pattern in (("function", "FUNCTIONS", ENTRY), ("class", "CLASSES", CLASS)):
        for name, sig, doc in _entries(parts.get(section, ""), pattern):
            if name.startswith("_") or name in seen:  # a later entry of the same name is a mention in prose
                continue
            seen.add(name)
            doc = RETURNS.sub("", doc, count=1)
            if doc.lstrip().startswith("-->"):  # "deque([iterable[, maxlen]]) --> deque object": not prose
                continue
            summary = first_sentence(_doc_text(name, doc))
            if summary:
                entries.append(Entry(module, kind, name, summary, sig if kind == "function" else ""))
    return entries


def questions(entries: list[Entry]) -> list[QA]:
    """Question/answer pairs about every entry; "which module" only for names one module defines."""
    defined_by = Counter(e.name for e in {(e.module, e.name): e for e in entries if e.name}.values())
    out = []
    for e in entries:
        qual = f"{e.module}.{e.name}"
        if e.kind == "module":
            out.append(QA("module", f"What is the {e.module} module for?", e.summary, False))
            continue
        if e.kind == "function":
            out.append(QA("function", f"What does {qual} do?", e.summary, False))
            if len(e.signature) <= MAX_SIGNATURE_CHARS and e.signature != "(...)":  # "(...)": pydoc could not tell
                out.append(QA("signature", f"What is the signature of {qual}?", f"{qual}{e.signature}", True))
        else:
            out.append(QA("class", f"What is {qual}?", e.summary, False))
        if defined_by[e.name] == 1:
            out.append(QA("where", f"Which module provides {e.name}?", e.module, True))
    return out


# -- open-book form ---------------------------------------------------------------------------------------


def numbered_passage(i: int, title: str, text: str) -> str:
    """One passage as `family rag` shows it to the chat model: "[i] title" then its text."""
    return f"[{i}] {title}\n{text}"


def context_prompt(question: str, parts: list[str]) -> str:
    """The open-book user turn: the numbered passages, then the question (the question alone without
    passages). stages/search/pipeline.rag_messages and the instruct stage's open-book docqa rows
    both write it, so SFT teaches the form that rag asks in."""
    return "\n\n".join(parts) + f"\n\nQuestion: {question}" if parts else question


def entry_passage(e: Entry) -> tuple[str, str]:
    """(title, text) of an entry, shaped like the retrieval stage's passage of it: the qualified name,
    then its head line (signature or class line) and first sentence."""
    if e.kind == "module":
        return e.module, f"{e.module} - {e.summary}"
    qual = f"{e.module}.{e.name}"
    head = f"class {qual}{e.signature}" if e.kind == "class" else f"{qual}{e.signature}"
    return qual, f"{head} {e.summary}".strip()
