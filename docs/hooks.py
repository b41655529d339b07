"""MkDocs hook: docstrings written for Sphinx read well on the API pages too.

bnlab's docstrings use reST roles (``:class:`X```) and ``::`` before literal blocks. The
API pages render them as Markdown, where a role would show as ``:class:`` text in front of
the name: drop the role (keeping the code-formatted name) and the second colon of ``::``.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):(?=<code>|<a )")
_LITERAL_MARK = re.compile(r"::</p>")
_TILDE = re.compile(r"<code>~")  # :class:`~a.b.C` (Sphinx shows C; we show the path)


def on_page_content(html: str, **kwargs: Any) -> str:
    return _TILDE.sub("<code>", _LITERAL_MARK.sub(":</p>", _ROLE.sub("", html)))
