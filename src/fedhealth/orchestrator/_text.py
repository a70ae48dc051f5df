"""Text that goes into a Markdown report: one line, safe inside a table cell."""

from __future__ import annotations

import re

# Every character that could end a Markdown line or a table cell: C0/C1 controls (\n, \r, ...), the
# Unicode line and paragraph separators.
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def one_line(text: object) -> str:
    """``text`` as one line of a Markdown report, safe inside a table cell: a reason (a cancelling user's
    words, a study's failure summary) must not start a heading, a list or a row of its own."""
    return _LINE_BREAKS.sub(" ", str(text)).replace("|", "\\|").strip()
