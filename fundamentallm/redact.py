"""Credentials in URLs, masked before text is shown, logged or recorded.

A module of its own, with nothing but the standard library, because every layer needs it:
corpus sources (labels, log lines, errors), the MLflow tracker (params, tags, failure
reasons) and `deployments/services.py` (database settings it prints or refuses).
"""

from __future__ import annotations

import re

# The userinfo runs greedily to the last "@" before the authority ends (at "/" or
# whitespace), so an unencoded "@", ":", "?" or "#" in a password is masked with the rest;
# "?" and "#" do not end it for the same reason (over-masking a query is harmless).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def mask_credentials(text: str) -> str:
    """`text` with the userinfo of every URL in it (``user:password@``, ``token@``) replaced by
    ``***@``, for any scheme: ``postgresql+psycopg2://u:p@db/x`` becomes
    ``postgresql+psycopg2://***@db/x``. The userinfo is everything from ``scheme://`` to the last
    ``@`` before the next ``/`` or whitespace. A password holding an unencoded ``/`` or space
    cannot be told from a path or the next word: percent-encode those."""
    return _USERINFO.sub(lambda m: f"{m.group('scheme')}***@", text)
