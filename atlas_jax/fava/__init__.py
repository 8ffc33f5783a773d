"""A Fava extension: an "Ask" page inside Fava that answers questions about the open ledger.

Enable it in the ledger (Fava's extension API):

    2010-01-01 custom "fava-extension" "atlas_jax.fava" "{'run': '/path/to/demo_out'}"

`run` answers in Fava's own process, on the same code path as `atlas-jax ask` / `serve`
(`ledger_qa.LedgerQA`, loaded on the first question; the index is synced with the ledger
Fava has open whenever its files change). `{'url': 'http://127.0.0.1:8765', 'token': T}`
sends the questions to a running `atlas-jax serve` instead (started with the same ledger).
Evidence entries link to Fava's own view of the entry (its context overlay). The page is at
`/<ledger>/extension/AtlasAsk/?q=...` and has a JSON endpoint `.../extension/AtlasAsk/ask`
(POST `{"question": ...}`).
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fava.ext import FavaExtensionBase, extension_endpoint
from markupsafe import Markup

_SERVICES: dict[tuple[str, str], Any] = {}     # (run dir, ledger) -> LedgerService
_LOCK = threading.Lock()


def _service(run_dir: str, ledger: str):
    """One loaded model per (run, ledger) and process: Fava builds a new extension object
    on every reload of the ledger."""
    from atlas_jax.ledger import serve
    from atlas_jax.ledger.qa import LedgerQA
    key = (str(Path(run_dir).absolute()), str(Path(ledger).absolute()))
    with _LOCK:
        if key not in _SERVICES:
            _SERVICES[key] = serve.LedgerService(LedgerQA.load(key[0]), key[1])
        return _SERVICES[key]


class AtlasAsk(FavaExtensionBase):
    """The "Ask" report."""

    report_title = "Ask"

    def __init__(self, ledger: Any, config: str | None = None) -> None:
        super().__init__(ledger, config)
        options = self.config if isinstance(self.config, dict) else {}
        self.run_dir, self.url = options.get("run"), options.get("url")
        self.token = options.get("token")
        if not (self.run_dir or self.url):
            raise ValueError("atlas_jax.fava: configure {'run': DEMO_DIR} or "
                             "{'url': 'http://127.0.0.1:8765'}")

    # ------------------------------------------------------------------ answering
    def answer(self, question: str) -> dict:
        """The answer dict (`LedgerQA.answer`); raises ValueError with a message to show."""
        if self.url:
            return self._remote(question)
        from atlas_jax.ledger import serve
        service = _service(self.run_dir, self.ledger.beancount_file_path)
        if service.last_sync is None or service.changed():
            if service.sync() is None:
                raise ValueError(f"the ledger did not load: {service.last_sync_error}")
        try:
            return service.ask(question)
        except serve.RequestError as e:
            raise ValueError(str(e)) from None

    def _remote(self, question: str) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url.rstrip("/") + "/ask", headers=headers,
                                         data=json.dumps({"question": question}).encode())
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as e:
            raise ValueError(f"{self.url}: {e.code} {e.read().decode()[:300]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"{self.url}: not reachable ({e})") from None

    def entry_link(self, hit: dict) -> str | None:
        """Fava's view of an evidence entry (its context overlay over the journal), found by
        the entry's file and line."""
        from flask import url_for

        from fava.beans.funcs import hash_entry
        metadata = hit.get("metadata") or {}
        if not metadata.get("file") or not metadata.get("line"):
            return None
        root = Path(self.ledger.beancount_file_path).parent
        where = (str((root / metadata["file"]).absolute()), metadata["line"])
        for entry in self.ledger.all_entries:
            meta = getattr(entry, "meta", None) or {}
            if (meta.get("filename"), meta.get("lineno")) == where:
                # Fava shows an entry's context as an overlay: `#context-<entry hash>`.
                return f"{url_for('report', report_name='journal')}#context-{hash_entry(entry)}"
        return None

    def render_answer(self, question: str) -> Markup:
        """The answer and evidence table as HTML (the template calls this)."""
        from atlas_jax.ledger import serve_page
        try:
            result = self.answer(question)
        except ValueError as e:
            return Markup('<p class="error">{}</p>').format(str(e))
        return Markup(serve_page.render_result(result, self.entry_link))  # noqa: S704

    @extension_endpoint("ask", ["POST"])
    def ask_endpoint(self):
        from flask import jsonify, request
        body = request.get_json(silent=True) or {}
        try:
            return jsonify(self.answer(body.get("question")))
        except ValueError as e:
            return jsonify({"error": str(e)}), 400
