"""The corpus chunked by meaning into passages, and the queries its structure gives.

Passages (`page_passages`): a pydoc page (stages/chat/docqa.py reads its sections) becomes
- its module docstring, cut at its own headings ("Pretty printing::", "Usage:"): kind module / section;
- one passage per public function ("json.dumps(obj, *, ...)\\n<its documentation>") and per public class
  ("class json.JSONDecoder(builtins.object)\\n<its documentation, without pydoc's member listings>").
A text longer than `max_chars` is cut at sentence ends into at most `max_chunks` passages, each with
the entry's head line, so every passage names what it documents. The URL carries pydoc's anchor
(`#-dumps` for a function, `#JSONDecoder` for a class). A page that is not pydoc's is cut into
paragraph chunks under its title, so any corpus gives passages.

Queries (`page_queries`), several kinds from the structure, each with its source passage (relevance
2) and the other chunks of the same entry (relevance 1):
    signature       "json.dumps(obj, *, skipkeys=False, ...)"  -> the function's passage
    heading         "json: Pretty printing"                   -> that docstring section
    first_sentence  "Serialize obj to a JSON formatted str."   -> the entry (ICT-style: a sentence -> its passage)
    paraphrase      "how to convert value to a JSON formatted text" -> the entry: the first sentence
                    with the entry's own names dropped and its words rewritten through PARAPHRASES,
                    so that it shares few words with its passage and BM25 is not flattered
`overlap(query, passage)` is the share of the query's BM25 terms found in the passage.

Split by page (`page_split`): a page's URL hash puts it in train, val or test; a query's split is
its page's, training pairs come from train pages only, and retrieval searches every passage.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from stages.chat.docqa import CLASS, ENTRY, RETURNS, _doc_text, _entries, first_sentence, flat, module_name, sections
from stages.search.bm25 import terms

HEADING = re.compile(r"^([A-Z][^.!?:]{2,60}?):{1,2}$")  # "Pretty printing::", "Usage:" on a line of its own
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`(\"'*])")
MAX_SIGNATURE_CHARS = 120

# Words of documentation prose and plainer ones a person might type instead (a query writer's
# paraphrase). Both sides lower case; a code identifier is left as it is unless listed.
PARAPHRASES = {
    "return": "give back", "returns": "gives back", "returned": "given back", "create": "make", "creates": "makes",
    "construct": "build", "constructs": "builds", "object": "value", "objects": "values", "obj": "value",
    "string": "text", "strings": "texts", "str": "text", "list": "array", "lists": "arrays", "sequence": "series",
    "file": "document on disk", "files": "documents on disk", "directory": "folder", "directories": "folders",
    "path": "location", "pathname": "location", "function": "routine", "functions": "routines", "method": "routine",
    "argument": "parameter", "arguments": "parameters", "integer": "whole number", "integers": "whole numbers",
    "int": "whole number", "number": "numeric value", "numbers": "numeric values", "float": "decimal",
    "character": "letter", "characters": "letters", "remove": "delete", "removes": "deletes", "delete": "erase",
    "deletes": "erases", "convert": "turn", "converts": "turns", "serialize": "encode", "deserialize": "decode",
    "parse": "break down", "parses": "breaks down", "split": "cut", "splits": "cuts", "join": "glue",
    "joins": "glues", "compute": "calculate", "computes": "calculates", "calculate": "work out",
    "value": "quantity", "values": "quantities", "instance": "example object", "class": "type", "classes": "types",
    "dictionary": "mapping", "dict": "mapping", "mapping": "lookup table", "key": "lookup name", "keys": "lookup names",
    "element": "member", "elements": "members", "item": "entry", "items": "entries", "iterable": "collection",
    "iterator": "stream", "iterators": "streams", "generator": "lazy stream", "set": "assign", "sets": "assigns",
    "get": "fetch", "gets": "fetches", "read": "load", "reads": "loads", "write": "save", "writes": "saves",
    "open": "start using", "opens": "starts using", "close": "finish with", "closes": "finishes with",
    "raise": "throw", "raises": "throws", "error": "failure", "errors": "failures", "exception": "failure",
    "true": "yes", "false": "no", "none": "nothing", "empty": "blank", "default": "usual", "optional": "not required",
    "specified": "given", "given": "supplied", "new": "fresh", "current": "present", "first": "initial",
    "last": "final", "next": "following", "previous": "earlier", "maximum": "largest", "minimum": "smallest",
    "smallest": "least", "largest": "biggest", "random": "chance", "time": "clock reading", "date": "calendar day",
    "module": "library", "program": "script", "process": "running program", "thread": "worker", "data": "information",
    "buffer": "byte store", "bytes": "raw octets", "byte": "octet", "encoding": "charset", "encode": "turn into bytes",
    "decode": "turn from bytes", "format": "layout", "formatted": "laid out", "output": "result", "input": "incoming",
    "test": "check", "tests": "checks", "check": "verify", "checks": "verifies", "match": "fit", "matches": "fits",
    "pattern": "template", "search": "look", "find": "locate", "finds": "locates", "replace": "swap", "copy": "duplicate",
    "copies": "duplicates", "add": "append", "adds": "appends", "insert": "put in", "sort": "order", "sorted": "ordered",
    "count": "tally", "length": "size", "size": "extent", "name": "label", "names": "labels", "type": "kind",
    "types": "kinds", "call": "invoke", "called": "invoked", "calls": "invokes", "use": "employ", "used": "employed",
    "user": "person", "system": "platform", "socket": "network endpoint", "server": "host", "client": "caller",
    "stream": "flow", "text": "prose", "line": "row", "lines": "rows", "word": "token", "words": "tokens",
    "wrapper": "shell", "return_value": "result", "subclass": "derived type", "attribute": "field",
    "attributes": "fields", "signal": "notification", "handler": "callback", "environment": "settings",
    "variable": "setting", "variables": "settings", "initialize": "set up", "initialise": "set up", "reset": "restore",
    "apply": "run", "applies": "runs", "test_case": "check case", "whether": "if", "wait": "pause", "waits": "pauses",
    "base": "parent", "abstract": "generic", "interface": "API", "like": "similar to", "using": "with",
    "message": "note", "event": "occurrence", "raised": "thrown", "mode": "setting", "tuple": "fixed series",
    "same": "identical", "package": "bundle", "queue": "waiting line", "methods": "routines", "loop": "cycle",
    "version": "release", "implements": "provides", "implementation": "realisation", "command": "instruction",
    "source": "origin", "found": "located", "change": "alter", "specific": "particular", "group": "bunch",
    "containing": "holding", "contains": "holds", "support": "allow", "header": "heading line", "single": "lone",
    "memory": "RAM", "simple": "basic", "two": "a pair of", "access": "reach", "returning": "giving back",
    "operation": "action", "operations": "actions", "representation": "form", "based": "built", "child": "sub",
    "connection": "link", "related": "linked", "provides": "offers", "compile": "build", "stack": "pile",
    "equivalent": "same as", "binary": "raw", "hash": "digest", "about": "regarding", "point": "spot", "only": "just",
    "start": "begin", "common": "shared", "information": "details", "standard": "usual", "execute": "run",
    "manager": "controller", "entries": "records", "between": "among", "level": "tier", "document": "record",
    "contents": "content", "request": "ask", "real": "actual", "block": "chunk", "numeric": "number-like",
    "configuration": "setup", "log": "record", "order": "sequence", "result": "outcome", "more": "extra",
    "status": "state", "generate": "produce", "print": "display", "collection": "bunch", "corresponding": "matching",
    "without": "lacking", "address": "location", "perform": "carry out", "handle": "deal with",
    "temporary": "short-lived", "represent": "stand for", "fields": "slots", "after": "following", "absolute": "full",
    "most": "nearly all", "representing": "standing for", "optionally": "possibly", "according": "following",
    "named": "called", "instances": "examples", "descriptor": "accessor",
    "code": "source text", "one": "a single", "context": "surroundings", "run": "execute", "future": "pending result",
}


@dataclass(frozen=True)
class Passage:
    id: str
    doc_id: str
    url: str  # with the anchor
    title: str
    text: str
    kind: str  # module | section | function | class | text
    entry: str  # what it documents ("json.dumps"): the chunks of one entry are relevant to its queries
    summary: str = ""  # the first sentence of the entry's documentation (chunk 0 only)
    signature: str = ""  # "json.dumps(obj, *, ...)" (functions, chunk 0 only)
    heading: str = ""  # the docstring heading of a section passage
    names: tuple[str, ...] = ()  # (module, name) or (module,): the last is dropped from its paraphrase query


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    kind: str
    positive: str  # passage id
    relevant: dict[str, int] = field(default_factory=dict)  # passage id -> relevance (2 positive, 1 sibling)


def stable_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


def page_split(url: str, val_frac: float, test_frac: float, seed: int = 0) -> str:
    """train, val or test for a page, from a hash of its URL (and the seed): stable across runs and corpora."""
    u = int(hashlib.sha1(f"{seed}:{url}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test_frac else "val" if u < test_frac + val_frac else "train"


def cut(text: str, max_chars: int, max_chunks: int) -> list[str]:
    """`text` (flattened) in pieces of at most max_chars, cut at sentence ends (a sentence longer than
    max_chars at a word), at most max_chunks pieces; what is left after them is dropped."""
    pieces: list[str] = []
    current = ""
    for sentence in SENTENCE.split(flat(text)):
        while len(sentence) > max_chars:  # a run-on "sentence" (a code listing): cut at a space
            at = sentence.rfind(" ", 0, max_chars)
            at = at if at > 0 else max_chars
            head, sentence = sentence[:at], sentence[at:].lstrip()
            if current:
                pieces.append(current)
                current = ""
            pieces.append(head)
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}".strip()
    if current:
        pieces.append(current)
    return [p for p in pieces if p][:max_chunks]


def _chunks(doc_id: str, url: str, title: str, head: str, body: str, kind: str, entry: str, max_chars: int,
            max_chunks: int, **first: str | tuple[str, ...]) -> list[Passage]:
    """Passages of one entry: `head` (its name line) above each piece of `body`."""
    budget = max(40, max_chars - len(head) - 1)
    out = []
    for k, piece in enumerate(cut(body, budget, max_chunks) or [""]):
        text = f"{head}\n{piece}".strip() if head else piece
        if not text:
            continue
        extra = first if k == 0 else {"names": first.get("names", ())}
        out.append(Passage(stable_id(url, str(k)), doc_id, url, title, text, kind, entry, **extra))
    return out


def docstring_sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) parts of a module docstring: the text before the first heading has heading ""."""
    parts: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        m = HEADING.match(line.strip())
        if m and len(line.strip().split()) <= 8:
            parts.append((m.group(1).strip(), []))
        else:
            parts[-1][1].append(line)
    return [(h, "\n".join(b).strip()) for h, b in parts if "\n".join(b).strip()]


def page_passages(doc_id: str, url: str, title: str, text: str, max_chars: int = 600,
                  max_chunks: int = 3) -> list[Passage]:
    """The passages of one page (see the module docstring); [] for a page with no text."""
    module = module_name(url, title, text)
    if module is None:
        head = flat(title or "")
        return _chunks(doc_id, url, head or url, head, text, "text", url, max_chars, max_chunks)
    parts = sections(text)
    out: list[Passage] = []
    # the module docstring: HEAD of an extracted HTML page, DESCRIPTION of plain text
    docstring = parts.get("DESCRIPTION") or parts.get("HEAD", "")
    for heading, body in docstring_sections(docstring):
        heading = flat(heading)  # pydoc writes &nbsp; between words
        anchor_url = url if not heading else f"{url}#{stable_id(heading)[:8]}"
        name = f"{module}: {heading}" if heading else module
        out += _chunks(doc_id, anchor_url, name, f"{module} module" + (f": {heading}" if heading else ""), body,
                       "section" if heading else "module", name, max_chars, max_chunks,
                       summary="" if heading else first_sentence(body), heading=heading, names=(module,))
    seen = set()
    for kind, section, pattern in (("function", "FUNCTIONS", ENTRY), ("class", "CLASSES", CLASS)):
        for name, sig, doc in _entries(parts.get(section, ""), pattern):
            if name.startswith("_") or name in seen:  # a later entry of the same name is a mention in prose
                continue
            seen.add(name)
            body = _doc_text(name, RETURNS.sub("", doc, count=1))
            if not body:
                continue
            qual = f"{module}.{name}"
            head = f"{qual}{sig}" if kind == "function" else f"class {qual}{sig}"
            anchor = f"-{name}" if kind == "function" else name
            sig_query = head if kind == "function" and len(sig) <= MAX_SIGNATURE_CHARS and sig != "(...)" else ""
            out += _chunks(doc_id, f"{url}#{anchor}", qual, head, body, kind, qual, max_chars, max_chunks,
                           summary=first_sentence(body), signature=sig_query, names=(module, name))
    return out


def paraphrase(sentence: str, names: tuple[str, ...]) -> str:
    """A plainer query for a first sentence: the entry's own name (the last of `names`: the function,
    class or module documented) dropped, words rewritten through PARAPHRASES, as "how to ..."
    ("Return the smallest item." -> "how to give back the least entry")."""
    own = {n.lower() for n in re.split(r"[._]", names[-1]) if n} if names else set()
    words = []
    for raw in sentence.rstrip(".").split():
        lead, core, trail = re.match(r"^([^\w]*)(.*?)([^\w]*)$", raw).groups()
        w = core.lower()
        if w in own or w.split(".")[-1] in own or w.split("(")[0] in own:
            continue
        words.append(lead.strip("`*") + PARAPHRASES.get(w, w) + trail.strip("`*"))
    text = " ".join(w for w in words if w).strip(" ,;:")
    return f"how to {text}" if text else ""


def overlap(query: str, passage: str) -> float:
    """Share of the query's BM25 terms (stemmed, stopwords out) that the passage contains; 1.0 for a
    query with no terms."""
    q = set(terms(query))
    return len(q & set(terms(passage))) / len(q) if q else 1.0


def page_queries(passages: list[Passage]) -> list[Query]:
    """The queries of one page's passages (kinds in the module docstring)."""
    by_entry: dict[str, list[Passage]] = {}
    for p in passages:
        by_entry.setdefault(p.entry, []).append(p)
    out: list[Query] = []
    for entry, chunks in by_entry.items():
        first = chunks[0]
        relevant = {c.id: 1 for c in chunks[1:]} | {first.id: 2}
        texts = []
        if first.signature:
            texts.append(("signature", first.signature))
        if first.heading:
            texts.append(("heading", f"{first.names[0]}: {first.heading}"))
        if first.summary:
            texts.append(("first_sentence", first.summary))
            para = paraphrase(first.summary, first.names)
            if len(para.split()) >= 4:
                texts.append(("paraphrase", para))
        for kind, text in texts:
            out.append(Query(stable_id(first.id, kind), text, kind, first.id, relevant))
    return out


# Questions no page of a Python documentation corpus answers: how often a "not found" threshold refuses them.
OFFTOPIC = (
    "Who painted the ceiling of the Sistine Chapel?", "What is the boiling point of water on Mount Everest?",
    "How many moons does Jupiter have?", "What is the capital of Australia?", "Who wrote Pride and Prejudice?",
    "How do I bake sourdough bread at home?", "What is the tallest mountain in Africa?",
    "When did the Roman Empire fall?", "How do vaccines train the immune system?", "What causes the seasons on Earth?",
    "Which team won the first football World Cup?", "How long should I boil an egg for a soft yolk?",
    "What is the speed of sound in air?", "Who composed the Four Seasons violin concertos?",
    "How do I change a flat bicycle tyre?", "What language is spoken in Brazil?", "How deep is the Mariana Trench?",
    "What is photosynthesis in plants?", "How do I train a puppy to sit?", "Who was the first person on the Moon?",
    "What is the population of Tokyo?", "How do tides depend on the Moon?", "What is the recipe for a margherita pizza?",
    "Which planet has the longest day?", "How do I tie a bowline knot?", "What are the rules of chess castling?",
    "Who invented the telephone?", "What is the largest desert in the world?", "How do bees make honey?",
    "What does a cardiologist treat?",
)
