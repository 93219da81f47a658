"""The one rule for labels and item names, wherever they come from: a zip's folders, a form, a PATCH,
a filter. What breaks it is refused naming the field (never rewritten into something else)."""

from __future__ import annotations

import unicodedata

from service.core.errors import InvalidParameterError, shorten

MAX_LABEL_CHARS = 200
MAX_NAME_CHARS = 1024


def _invisible(text: str) -> bool:
    """Control, format (zero-width, bidirectional overrides) or line/paragraph separator characters:
    text that would not show as what it is."""
    return any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text)


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a label (None when it can). A label is one folder's name in a zip."""
    if not 1 <= len(label) <= MAX_LABEL_CHARS:
        return f"a label has 1 to {MAX_LABEL_CHARS} characters"
    if _invisible(label):
        return "a label holds no control, format or separator characters"
    if not label.strip():
        return "a label is not blank"
    if "/" in label or "\\" in label:
        return "a label is one folder name: no '/' or '\\'"
    if label.startswith("."):
        return "a label does not start with '.' (zips' hidden folders are skipped)"
    return None


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an item's name (None when it can): a path in a zip, `label/file.jpg`."""
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"a name has 1 to {MAX_NAME_CHARS} characters"
    if _invisible(name):
        return "a name holds no control, format or separator characters"
    if "\\" in name or name.startswith("/"):
        return "a name is a relative path with '/' between its parts"
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return "a name's parts are not empty and do not start with '.'"
    if len(parts) > 1 and (folder := label_problem(parts[-2])):
        return f"its folder is its label: {folder}"
    return None


def _refuse(field: str, value: str, problem: str) -> InvalidParameterError:
    return InvalidParameterError(f"invalid {field} {shorten(value)!r}: {problem}", errors={field: [problem]})


def check_label(label: str, field: str = "label") -> str:
    """`label` if it is one; else a 422 naming `field`."""
    problem = label_problem(label)
    if problem:
        raise _refuse(field, label, problem)
    return label


def check_name(name: str, field: str = "name") -> str:
    """`name` if it is one; else a 422 naming `field`."""
    problem = name_problem(name)
    if problem:
        raise _refuse(field, name, problem)
    return name
