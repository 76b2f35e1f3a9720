"""Reward checks for prompts with reference answers: pure functions of (completion, answer).

GRPO scores rollouts with them and evaluation grades held-out prompts with them; the instruct
stage writes reference answers in exactly the form these check.

    exact       the completion equals the answer after normalising whitespace, case, surrounding
                quotes/backticks and a trailing full stop ("Nohtyp." matches "nohtyp")
    exact_case  the same but case-sensitive (tasks whose answer is about case: "PYTHON")
    numeric     the last number in the completion equals the answer ("12 + 30 = 42" matches "42";
                thousands separators and a leading $ are allowed: "$1,250" matches "1250")
"""
from __future__ import annotations

import math
import re
from typing import Callable

# a number: optional sign, digits with optional thousands separators, optional decimals
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
QUOTES = "\"'`“”‘’"


def _normalise(text: str) -> str:
    text = " ".join(text.split())
    text = text.strip(QUOTES + " ")
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1].rstrip(QUOTES + " ")
    return text


def exact(completion: str, answer: str) -> bool:
    return _normalise(completion).casefold() == _normalise(answer).casefold()


def exact_case(completion: str, answer: str) -> bool:
    return _normalise(completion) == _normalise(answer)


def parse_number(text: str) -> float:
    """`text` as a number ("1,250" -> 1250.0); raises ValueError when it is not one."""
    s = text.strip().lstrip("$")
    if not NUMBER.fullmatch(s):
        raise ValueError(f"not a number: {text!r}")
    return float(s.replace(",", ""))


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None. A minus between two digits ("5-3") is an
    operator, not the sign of the second number."""
    last = None
    for m in NUMBER.finditer(text):
        token = m.group()
        if token.startswith("-") and m.start() > 0 and text[m.start() - 1].isalnum():
            token = token[1:]
        last = token
    return None if last is None else float(last.replace(",", ""))


def numeric(completion: str, answer: str) -> bool:
    got = last_number(completion)
    return got is not None and math.isclose(got, parse_number(answer), rel_tol=1e-9, abs_tol=1e-9)


VERIFIERS: dict[str, Callable[[str, str], bool]] = {"exact": exact, "exact_case": exact_case, "numeric": numeric}


def verify(verifier: str, completion: str, answer: str) -> bool:
    """True when `completion` gives `answer` according to `verifier` (a key of VERIFIERS)."""
    try:
        check = VERIFIERS[verifier]
    except KeyError:
        raise ValueError(f"unknown verifier {verifier!r} (known: {', '.join(VERIFIERS)})") from None
    return check(completion, answer)
