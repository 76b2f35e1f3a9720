"""A page row in the `pages` schema (storage/schemas.py), as every source produces it."""
from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any


def page_row(url: str, final_url: str, status: int, content_type: str, fetched_at: datetime, body: bytes) -> dict[str, Any]:
    return {
        "url": url,
        "final_url": final_url,
        "status": status,
        "content_type": content_type,
        "fetched_at": fetched_at,
        "body": body,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
