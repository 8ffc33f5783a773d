"""The HTML of `atlas-jax serve`'s page and of the Fava "Ask" page (one rendering of an answer).

Server-rendered (a GET form), so it works in any browser without JavaScript; every value from
the ledger or the question is HTML-escaped.
"""
from __future__ import annotations

import html
from typing import Callable

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;padding:0 1em;color:#222}
form{display:flex;gap:.5em}input[name=q]{flex:1;font-size:1.1em;padding:.4em}
button{font-size:1.1em}.answer{font-size:1.4em;margin:1em 0 .3em}
.sure{color:#17612b}.unsure{color:#9a5b00}.why{margin:.2em 0 1em 1.2em;color:#9a5b00}
table{border-collapse:collapse;width:100%;font-size:.9em}
td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left;vertical-align:top}
pre{margin:0;white-space:pre-wrap}.states{background:#eef8ee}.meta{color:#666;font-size:.9em}
.error{color:#a00}
"""


def render_result(result: dict, link: Callable[[dict], str | None] | None = None) -> str:
    """An answer dict (`LedgerQA.answer`) as an HTML fragment: the answer ("not sure" and
    why, when a check failed) and the evidence table. `link(evidence)` gives an href for an
    evidence entry (e.g. Fava's view of it), or None."""
    e = html.escape
    sure = not result["low_confidence"]
    parts = [f'<div class="answer {"sure" if sure else "unsure"}" id="answer">'
             f'{e(result["answer"]) or "(no answer)"}'
             f'{"" if sure else " <strong>(not sure)</strong>"}</div>',
             f'<div class="meta">reader likelihood {result["confidence"]:.2f}; asks for: '
             f'{e(str(result.get("answer_type") or "unknown"))}; filters: '
             f'{e(", ".join(result["filters"]) or "(none)")}; index version '
             f'{result.get("index_version", "?")}; {result.get("seconds", 0):.2f} s</div>']
    if not sure:
        parts.append('<ul class="why" id="why">' + "".join(
            f"<li>{e(reason)}</li>" for reason in result["why_low"]) + "</ul>")
    rows = []
    for rank, hit in enumerate(result["evidence"], 1):
        where = e(hit.get("location") or hit.get("date") or "")
        href = link(hit) if link else None
        if href:
            where = f'<a href="{e(href)}">{where}</a>'
        states = hit["id"] in result["grounded_in"]
        rows.append(f'<tr class="{"states" if states else ""}"><td>{rank}</td>'
                    f'<td>{hit["score"]:.4f}</td><td>{where}</td>'
                    f'<td><pre>{e(hit["text"])}</pre></td>'
                    f'<td>{"states the answer" if states else ""}</td></tr>')
    parts.append('<table id="evidence"><tr><th>#</th><th>score</th><th>where</th>'
                 '<th>entry</th><th></th></tr>' + "".join(rows) + "</table>")
    return "\n".join(parts)


def render_form(question: str, action: str = "", token: str = "") -> str:
    e = html.escape
    hidden = f'<input type="hidden" name="token" value="{e(token)}">' if token else ""
    return (f'<form method="get" action="{e(action)}"><input name="q" value="{e(question)}" '
            'placeholder="Who was paid 40.88 USD on 5 Jan 2021?" autofocus>'
            f'{hidden}<button type="submit">Ask</button></form>')


def render(question: str, result: dict | None, error: str | None, token: str = "") -> str:
    """The whole page of `atlas-jax serve`."""
    body = [render_form(question, "/", token)]
    if error:
        body.append(f'<p class="error">{html.escape(error)}</p>')
    if result is not None:
        body.append(render_result(result))
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>atlas-jax: ask your "
            f"ledger</title><style>{STYLE}</style></head><body><h1>Ask your ledger</h1>"
            + "\n".join(body) + "</body></html>")
