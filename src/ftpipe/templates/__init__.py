"""Chat templates shipped with ftpipe (Jinja files beside this module), chosen with ``chat_template``."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

#: name -> file of every chat template that ships with ftpipe.
SHIPPED_CHAT_TEMPLATES = {"chatml-tools": "chatml_tools.jinja"}


def chat_template_problem(value: str) -> str | None:
    """None when ``value`` names a shipped template or an existing file, else what is wrong."""
    if value in SHIPPED_CHAT_TEMPLATES:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return None
    return (
        f"{value!r} is neither a chat template shipped with ftpipe ({', '.join(SHIPPED_CHAT_TEMPLATES)}) "
        f"nor an existing Jinja file (looked for {path.resolve()})"
    )


def chat_template_text(value: str) -> str:
    """The Jinja source of a shipped template name or of a template file."""
    problem = chat_template_problem(value)
    if problem:
        raise FileNotFoundError(f"chat_template: {problem}")
    if value in SHIPPED_CHAT_TEMPLATES:
        return (_HERE / SHIPPED_CHAT_TEMPLATES[value]).read_text(encoding="utf-8")
    return Path(value).expanduser().read_text(encoding="utf-8")
