"""PII scrubbing: replace e-mail addresses, public IP addresses and phone numbers with placeholders.

A modifier, never a drop. FineWeb's PIIFormatter (datatrove) replaces e-mails and public IPv4
addresses with dummy values; we use visible placeholders (<EMAIL>, <IP>, <PHONE>) so a model never
learns a fake address as if it were real, and add IPv6 and phone numbers. Like datatrove, only
globally routable IPs are replaced: 127.0.0.1 or 192.168.0.1 in documentation identify no one.

Phone numbers are matched conservatively, since documentation is full of digit groups: an optional
"+CC", an area code (in parentheses or followed by a space or hyphen) and a subscriber number in two
groups of 3-4 digits, 10 to 15 digits in all. Dots are not separators, so version numbers and IPv4
addresses never match. Counts go to doc["stats"] as pii/email, pii/ip and pii/phone.
"""
from __future__ import annotations

import ipaddress
import re

from stages.quality import Verdict, add_stat

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
# the IP patterns find candidates; ipaddress.ip_address decides (octets <= 255, a valid IPv6)
IPV4_RE = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\w)")
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|:)(?![\w:]|\.\w)")
PHONE_RE = re.compile(
    r"""(?<![\w+])
    (?:\+\d{1,3}[ -]?)?              # country code
    (?:\(\d{1,4}\)[ -]?|\d{2,4}[ -])  # area code
    \d{3,4}[ -]\d{3,4}               # subscriber number
    (?![\w-])""",
    re.VERBOSE,
)
PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>"}


def _is_global_ip(s: str) -> bool:
    try:
        return ipaddress.ip_address(s).is_global
    except ValueError:
        return False


def scrub(text: str, kinds: tuple[str, ...] = ("email", "ip", "phone")) -> tuple[str, dict[str, int]]:
    """(text with PII replaced, replacements per kind). IPs go before phones so no IP is read as a phone."""
    counts = dict.fromkeys(kinds, 0)

    def replace(kind: str, check=None):
        def sub(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return sub

    if "email" in kinds:
        text = EMAIL_RE.sub(replace("email"), text)
    if "ip" in kinds:
        text = IPV4_RE.sub(replace("ip", _is_global_ip), text)
        text = IPV6_RE.sub(replace("ip", _is_global_ip), text)
    if "phone" in kinds:
        text = PHONE_RE.sub(replace("phone", lambda s: 10 <= sum(c.isdigit() for c in s) <= 15), text)
    return text, counts


class PIIScrubber:
    name = "pii"

    def __init__(self, kinds: tuple[str, ...] = ("email", "ip", "phone")):
        unknown = set(kinds) - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)} (known: {', '.join(PLACEHOLDERS)})")
        self.kinds = tuple(kinds)

    def filter(self, doc: dict) -> Verdict:
        doc["text"], counts = scrub(doc["text"], self.kinds)
        for kind, n in counts.items():
            add_stat(doc, f"pii/{kind}", n)
        return True
