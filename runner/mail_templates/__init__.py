"""The mail templates (package data: NAME.txt and NAME.html beside this file) and their subjects.

`render(name, **values)` gives the subject, the text body and the HTML body; a value a template
needs and was not given is an error, never an empty hole in a mail.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import jinja2

# name -> subject (a template too); the bodies are NAME.txt and NAME.html
SUBJECTS: dict[str, str] = {
    "reset_password": "Your password reset code: {{ code }}",
    "indexing_finished": "{% if status == 'completed' %}Indexed{% else %}Indexing failed{% endif %}: "
                         "{{ document_name }}",
    "queue_alert": "Queue {{ queue }} holds {{ depth }} tasks (threshold {{ threshold }})",
    "datasets_cleaned": "Unused knowledge bases were cleaned up",
}


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str


@lru_cache(maxsize=2)
def _environment(autoescape: bool) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("runner", "mail_templates"), autoescape=autoescape,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(name: str, **values: Any) -> RenderedMail:
    if name not in SUBJECTS:
        raise LookupError(f"no mail template {name!r}; there are: {', '.join(SUBJECTS)}")
    try:
        subject = _environment(False).from_string(SUBJECTS[name]).render(**values)
        text = _environment(False).get_template(f"{name}.txt").render(**values)
        html = _environment(True).get_template(f"{name}.html").render(**values)
    except jinja2.UndefinedError as error:
        raise ValueError(f"mail template {name!r}: {error}") from None
    return RenderedMail(" ".join(subject.split()), text, html)
