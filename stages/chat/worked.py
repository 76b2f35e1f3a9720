"""Worked replies of the generated instruct tasks, and the wrong replies made from them.

Arithmetic is worked as taught at school: sums and differences column by column from the ones up
(`column_work`), products by partial products (`product_work`); `work` gives a question's reply and,
with a generator, its near miss (the same work, the result a little off at the end). A letter count
walks through the word keeping a tally, each letter beside the one asked about (`count_work`). A slip
is one mistake inside the work that every later step follows: `column_slips`, `product_slips` and
`slips_of` list the ones a reply can make (a carry or borrow dropped, a digit one off, a partial
product off in one digit), `slip_work` writes the reply with one, `pick_slips` chooses among them;
count_work's slip is a letter miscounted. Why replies are worked and pairs slip: stages/instruct.py
(Tasks, Hard pairs).
"""
from __future__ import annotations

import random
from typing import Any

# -- arithmetic -----------------------------------------------------------------------------------------


def near_miss(value: int, rng: random.Random, low: int | None = None) -> int:
    """A number a little off `value` (never equal to it, never below `low`)."""
    while True:
        wrong = value + rng.choice([-1, 1]) * rng.choice([1, 1, 2, 3, 10])
        if wrong != value and (low is None or wrong >= low):
            return wrong


def digits(n: int, width: int) -> list[int]:
    """The digits of n >= 0 from the ones up, padded with zeros to `width`."""
    return [int(c) for c in reversed(str(n).zfill(width))]


def column_work(a: int, b: int, op: str, slip: tuple[int, str] | None = None) -> tuple[str, int]:
    """Column addition or subtraction (a >= b) from the ones up, the way it is taught at school, and its
    result. The last line restates the sum, so its last number is the answer.

    47 + 58 -> "7 + 8 = 15, carry 1. 4 + 5 + 1 = 10, carry 1. 47 + 58 = 105"
    85 - 47 -> "15 - 7 = 8, borrow 1. 8 - 1 - 4 = 3. 85 - 47 = 38"

    With `slip` = (column from the ones, how), one slip there that every later step follows: "drop"
    leaves the carry or borrow out (neither written nor taken on), "up" / "down" writes the column's
    result one more / less. 47 + 58 with (0, "drop") -> "7 + 8 = 15. 4 + 5 = 9. 47 + 58 = 95".
    """
    width = len(str(max(a, b)))
    steps, out, carry = [], [], 0
    for i, (x, y) in enumerate(zip(digits(a, width), digits(b, width))):
        how = slip[1] if slip is not None and slip[0] == i else ""
        nudge = {"up": 1, "down": -1}.get(how, 0)
        if op == "+":
            s = x + y + carry + nudge
            carry_out = s // 10 if how != "drop" else 0
            steps.append(f"{x} + {y}{f' + {carry}' if carry else ''} = {s}{', carry 1' if carry_out else ''}")
            out.append(s % 10)
        else:
            borrow = int(x - carry < y)
            top = x + 10 * borrow
            d = top - carry - y + nudge
            carry_out = borrow if how != "drop" else 0
            steps.append(f"{top}{f' - {carry}' if carry else ''} - {y} = {d}{', borrow 1' if carry_out else ''}")
            out.append(d)
        carry = carry_out
    if op == "+" and carry:
        out.append(carry)
    result = int("".join(str(d) for d in reversed(out)))
    return ". ".join(steps) + f". {a} {op} {b} = {result}", result


def column_slips(a: int, b: int, op: str) -> list[tuple[int, str]]:
    """Every slip column_work can make in a op b: a carry or borrow dropped where one is taken (a carry
    out of the top column is the result's first digit, not dropped), a column's digit one up or down
    where it stays a digit (a sum up to 19)."""
    width = len(str(max(a, b)))
    slips, carry = [], 0
    for i, (x, y) in enumerate(zip(digits(a, width), digits(b, width))):
        if op == "+":
            value, top = x + y + carry, 19
            takes = value >= 10 and i < width - 1
            carry = value // 10
        else:
            borrow = int(x - carry < y)
            value, top, takes = x + 10 * borrow - carry - y, 9, bool(borrow)
            carry = borrow
        slips += [(i, how) for how, ok in (("drop", takes), ("up", value < top), ("down", value > 0)) if ok]
    return slips


def product_work(a: int, b: int, slip: tuple[int, int] | None = None) -> tuple[str, int]:
    """a * b by partial products of b's digits: "347 * 58 = 347 * 8 + 347 * 50 = 2776 + 17350 = 20126";
    a one-digit b is a single line. With `slip` = (part, error), that partial product is written off by
    `error` and the sum adds what was written."""
    parts = [(int(d) * 10**k, a * int(d) * 10**k) for k, d in enumerate(reversed(str(b))) if d != "0"]
    if slip is not None:
        parts[slip[0]] = (parts[slip[0]][0], parts[slip[0]][1] + slip[1])
    result = sum(v for _, v in parts)
    if len(parts) == 1:
        return f"{a} * {b} = {result}", result
    return (f"{a} * {b} = " + " + ".join(f"{a} * {m}" for m, _ in parts) + " = "
            + " + ".join(str(v) for _, v in parts) + f" = {result}"), result


def product_slips(a: int, b: int) -> list[tuple[int, int]]:
    """Every slip product_work can make: one digit of one partial product one up or down (not its
    trailing zeros, which the multiplier's place fixes); none for a one-line product."""
    parts = [(k, a * int(d) * 10**k) for k, d in enumerate(reversed(str(b))) if d != "0"]
    if len(parts) < 2:
        return []
    slips = []
    for j, (k, v) in enumerate(parts):
        for place in range(k, len(str(v))):
            digit = v // 10**place % 10
            slips += [(j, sign * 10**place) for sign, ok in ((1, digit < 9), (-1, digit > 0)) if ok
                      and len(str(v + sign * 10**place)) == len(str(v))]  # one digit changes, not the length
    return slips


def slips_of(a: int, op: str, b: int) -> list[tuple[int, Any]]:
    """Every slip the worked reply of a op b can make (column_slips, product_slips)."""
    return product_slips(a, b) if op == "*" else column_slips(a, b, op)


def slip_work(a: int, op: str, b: int, slip: tuple[int, Any]) -> tuple[str, int]:
    """The worked reply of a op b with `slip` (one of slips_of) and its wrong result."""
    return product_work(a, b, slip) if op == "*" else column_work(a, b, op, slip)


def pick_slips(options: list[Any], n: int, rng: random.Random) -> list[Any]:
    """n distinct slips of `options`; each a dropped carry or borrow half the time when one is left."""
    left, picked = list(options), []
    while left and len(picked) < n:
        drops = [o for o in left if o[-1] == "drop"]
        picked.append(rng.choice(drops if drops and rng.random() < 0.5 else left))
        left.remove(picked[-1])
    return picked


def work(a: int, op: str, b: int, worked: bool, rng: random.Random | None = None) -> tuple[str, int]:
    """The reply for a op b (op in "+-*", a >= b for "-"): worked out when `worked`, else "a op b = r".

    With `rng`, a plausible wrong reply instead: the same work with a result a little off at the end
    (a near miss), so the only tokens that differ from the right reply are the wrong result's. A slip
    inside the work carried through to the end is the other kind of wrong reply (slip_work): every
    token after it follows correctly from it, so a trainer that pushes the whole rejected reply down
    pushes down building on one's own steps too (it once cost DPO 39 points of arithmetic accuracy on
    tiny; with DPO's NLL term, training on slips beside near misses moved held-out arith and wordprob
    by -1.7 and -4.8 points against near misses alone, within noise; dpo.train_kinds chooses).
    """
    right = {"+": a + b, "-": a - b, "*": a * b}[op]
    if not worked:
        text = f"{a} {op} {b} = {right}"
    else:
        text, _ = product_work(a, b) if op == "*" else column_work(a, b, op)
    if rng is None:
        return text, right
    wrong = near_miss(right, rng, low=0)
    return text.rsplit("=", 1)[0] + f"= {wrong}", wrong


# -- letters --------------------------------------------------------------------------------------------


def letters(word: str, apart: bool) -> str:
    """A word as the model reads it in letter tasks: "p y t h o n" when `apart`, so every letter is
    a token of its own (a BPE token hides its letters: the "strawberry" problem)."""
    return " ".join(word) if apart else word


def count_work(word: str, letter: str, slip: int | None = None) -> str:
    """A letter count written out as a running tally: each letter of the word next to the letter
    asked about, then the number of matches so far ("n u 0, u u 1, l u 1, l u 1" for "u" in "null").
    Writing the two letters side by side makes each step a comparison of neighbouring tokens; with
    the sought letter only in the question ("n 0, u 1, ...") a 1.3M-parameter model copied the letters
    but never counted (every tally 0). With `slip`, the letter at that index is miscounted (a match
    missed, or another letter counted) and the tally goes on from there: "n u 0, u u 0, l u 0, l u 0"."""
    tally, steps = 0, []
    for i, c in enumerate(word):
        tally += (c == letter) != (i == slip)
        steps.append(f"{c} {letter} {tally}")
    return ", ".join(steps)
