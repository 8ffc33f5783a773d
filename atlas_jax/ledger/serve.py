"""`atlas-jax serve`: ledger QA you can leave running.

    atlas-jax serve --run DIR --ledger FILE [--host 127.0.0.1] [--port 8765] [--token T]

Loads the demo run's model and syncs the index with the ledger once (`ledger_qa.LedgerQA`),
then serves:

  GET  /            a page: question box, answer ("not sure" and why, when a check fails),
                    evidence table with file:line; works without JavaScript (`/?q=...`)
  POST /ask         JSON `{"question": "...", "k": 10}` -> answer, confidence, low_confidence,
                    why_low, answer_type, filters, evidence (id, file:line, date, score, text),
                    index_version, seconds
  GET  /health      JSON: status, index version, entries, ledger files, last sync and its error
  GET  /metrics     Prometheus text: index version and entries, syncs, request counts, /ask
                    latency quantiles (cold: the first answer; warm: the others); /metrics.json
                    the same as JSON

A watcher polls the ledger's files (the main file and every `include`d one) and, when one
changes, syncs in the background (`ledger_sync`: only added or changed entries are embedded)
and hot-swaps the index: searches are never blocked, and each answer uses one index version
throughout. A ledger that fails to load keeps the previous index; /health names the error
(file:line) until a later save fixes it.

Listens on 127.0.0.1 by default. Binding another address requires a token (`--token` or
ATLAS_JAX_TOKEN): requests then need `Authorization: Bearer T` (or `?token=T`); /health
stays open. Malformed requests get a 4xx JSON error, never a crash.
"""
from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import json
import os
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from atlas_jax.ledger import serve_page

MAX_BODY = 64 * 1024
MAX_QUESTION = 1000
MAX_K = 50
LATENCY_WINDOW = 1000


class RequestError(ValueError):
    """A malformed request: answered with `status` and the message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _percentiles(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {"count": len(values), "p50": float(np.percentile(array, 50)),
            "p95": float(np.percentile(array, 95)), "p99": float(np.percentile(array, 99)),
            "max": float(array.max())}


class LedgerService:
    """A `LedgerQA` kept in sync with a ledger file, plus the server's counters."""

    def __init__(self, qa: Any, ledger: str | Path, poll_seconds: float = 0.5):
        self.qa, self.ledger, self.poll_seconds = qa, str(Path(ledger).absolute()), poll_seconds
        self.started = time.time()
        self.files: list[str] = [self.ledger]
        self.last_sync: dict | None = None
        self.last_sync_error: str | None = None
        self.syncing = False
        self.counts = collections.Counter()
        self.cold: list[float] = []
        self.warm: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self.during_sync: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._signature = None

    # ------------------------------------------------------------------ sync
    def _stat(self) -> tuple:
        out = []
        for name in self.files:
            try:
                st = os.stat(name)
                out.append((name, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((name, None, None))
        return tuple(out)

    def sync(self) -> dict | None:
        """Syncs now; returns the report, or None when the ledger failed to load (the
        previous index stays; `last_sync_error` says why)."""
        signature = self._stat()
        self.syncing = True
        try:
            report = self.qa.sync(self.ledger)
        except (ValueError, OSError) as e:      # LedgerError names file:line
            self.last_sync_error = str(e)
            self.counts["sync_errors"] += 1
            self._signature = signature         # retry on the next save, not in a loop
            return None
        finally:
            self.syncing = False
        self.files = report.get("files") or [self.ledger]
        # A new list of files (an `include` added): check them all again on the next poll.
        self._signature = signature if [s[0] for s in signature] == self.files else None
        self.last_sync, self.last_sync_error = report, None
        self.counts["syncs"] += 1
        return report

    def changed(self) -> bool:
        """Whether a ledger file changed (or appeared, or vanished) since the last sync."""
        return self._stat() != self._signature

    def start_watching(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="ledger-watcher",
                                         daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            if not self.changed():
                continue
            signature = self._stat()
            time.sleep(min(self.poll_seconds, 0.2))   # let an editor finish writing
            try:
                self.sync()
            except Exception as e:  # noqa: BLE001 (the watcher must outlive any failure)
                self.last_sync_error = f"{type(e).__name__}: {e}"
                self.counts["sync_errors"] += 1
                self._signature = signature

    # ------------------------------------------------------------------ answers
    def ask(self, question: Any, k: Any = None) -> dict:
        if not isinstance(question, str) or not question.strip():
            raise RequestError(400, "'question' must be a non-empty string")
        if len(question) > MAX_QUESTION:
            raise RequestError(413, f"'question' is longer than {MAX_QUESTION} characters")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)
                              or not 1 <= k <= MAX_K):
            raise RequestError(400, f"'k' must be an integer in [1, {MAX_K}]")
        during_sync = self.syncing
        began = time.perf_counter()
        out = self.qa.answer(question, k)
        seconds = time.perf_counter() - began
        with self._lock:
            self.counts["answers"] += 1
            (self.cold if not self.cold else self.warm).append(seconds)
            if during_sync or self.syncing:
                self.during_sync.append(seconds)
        out["seconds"] = seconds
        return out

    def warm_up(self, question: str = "How much did I pay on 2000-01-01?") -> float:
        """One answer before serving (it compiles the model's functions); its latency is the
        `cold` one of /metrics."""
        return self.ask(question)["seconds"]

    def health(self) -> dict:
        version = self.qa.holder.current
        sync = self.last_sync or {}
        return {"status": "ok" if self.last_sync_error is None else "degraded",
                "index_version": self.qa.holder.version, "entries": len(version.index.store),
                "ledger": self.ledger, "files": self.files, "syncing": self.syncing,
                "last_sync": {k: sync.get(k) for k in ("synced_at", "seconds", "added",
                                                       "removed", "kept", "entries")},
                "last_sync_error": self.last_sync_error,
                "uptime_seconds": time.time() - self.started}

    def metrics(self) -> dict:
        with self._lock:
            latency = {"cold": _percentiles(self.cold), "warm": _percentiles(list(self.warm)),
                       "during_sync": _percentiles(list(self.during_sync))}
            counts = dict(self.counts)
        return {**self.health(), "counts": counts, "ask_latency_seconds": latency}


def prometheus(metrics: dict) -> str:
    """`metrics` in the Prometheus text exposition format."""
    last = metrics["last_sync"]
    lines = [
        "# TYPE atlas_jax_index_version gauge", f"atlas_jax_index_version {metrics['index_version']}",
        "# TYPE atlas_jax_index_entries gauge", f"atlas_jax_index_entries {metrics['entries']}",
        "# TYPE atlas_jax_last_sync_timestamp_seconds gauge",
        f"atlas_jax_last_sync_timestamp_seconds {last.get('synced_at') or 0}",
        "# TYPE atlas_jax_last_sync_duration_seconds gauge",
        f"atlas_jax_last_sync_duration_seconds {last.get('seconds') or 0}",
        "# TYPE atlas_jax_sync_error gauge",
        f"atlas_jax_sync_error {int(metrics['last_sync_error'] is not None)}"]
    for name in ("syncs", "sync_errors", "answers", "requests", "client_errors",
                 "server_errors"):
        lines += [f"# TYPE atlas_jax_{name}_total counter",
                  f"atlas_jax_{name}_total {metrics['counts'].get(name, 0)}"]
    lines.append("# TYPE atlas_jax_ask_latency_seconds summary")
    for phase, stats in metrics["ask_latency_seconds"].items():
        for q, quantile in (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99")):
            if q in stats:
                lines.append(f'atlas_jax_ask_latency_seconds{{phase="{phase}",'
                             f'quantile="{quantile}"}} {stats[q]:.6f}')
        lines.append(f'atlas_jax_ask_latency_seconds_count{{phase="{phase}"}} '
                     f"{stats['count']}")
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    """The endpoints of the module docstring; `make_handler` binds a service and a token."""
    server_version = "atlas-jax"
    protocol_version = "HTTP/1.1"
    service: LedgerService
    token: str | None = None

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: dict) -> None:
        if status >= 500:
            self.service.counts["server_errors"] += 1
        elif status >= 400:
            self.service.counts["client_errors"] += 1
        self._send(status, json.dumps(value).encode(), "application/json")

    def _authorized(self, query: dict) -> bool:
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "")
        given = given[len("Bearer "):] if given.startswith("Bearer ") else ""
        given = given or (query.get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        self.service.counts["requests"] += 1
        routes = {("GET", "/"): self._page, ("POST", "/ask"): self._ask,
                  ("GET", "/health"): self._health, ("GET", "/metrics"): self._metrics,
                  ("GET", "/metrics.json"): self._metrics_json}
        if (method, url.path) not in routes:
            allowed = [m for m, p in routes if p == url.path]
            if allowed:
                return self._json(405, {"error": f"{url.path} accepts {allowed[0]} only"})
            return self._json(404, {"error": f"no such path {url.path}"})
        if url.path != "/health" and not self._authorized(query):
            return self._json(401, {"error": "missing or wrong token"})
        try:
            routes[method, url.path](query)
        except RequestError as e:
            self._json(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 (one bad request must not stop the server)
            self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def do_GET(self):  # noqa: N802 (stdlib name)
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_PUT(self):  # noqa: N802
        self._route("PUT")

    def do_DELETE(self):  # noqa: N802
        self._route("DELETE")

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "a JSON body with a Content-Length is required") from None
        if length > MAX_BODY:
            raise RequestError(413, f"the body is over {MAX_BODY} bytes")
        raw = self.rfile.read(max(length, 0))
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RequestError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object with a 'question'")
        return body

    def _ask(self, query: dict) -> None:
        body = self._body()
        self._json(200, self.service.ask(body.get("question"), body.get("k")))

    def _page(self, query: dict) -> None:
        question = (query.get("q") or [""])[0]
        result = error = None
        if question:
            try:
                result = self.service.ask(question)
            except RequestError as e:
                error = str(e)
        page = serve_page.render(question, result, error, (query.get("token") or [""])[0])
        self._send(200, page.encode("utf-8"), "text/html; charset=utf-8")

    def _health(self, query: dict) -> None:
        self._json(200, self.service.health())

    def _metrics(self, query: dict) -> None:
        body = prometheus(self.service.metrics()).encode()
        self._send(200, body, "text/plain; version=0.0.4")

    def _metrics_json(self, query: dict) -> None:
        self._json(200, self.service.metrics())


def make_handler(service: LedgerService, token: str | None) -> type:
    """The request handler class bound to `service` (and the token, if any)."""
    return type("BoundHandler", (Handler,), {"service": service, "token": token})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, token: str | None) -> None:
    """Refuses an address other machines can reach unless requests must carry a token."""
    if not is_loopback(host) and not token:
        raise ValueError(f"--host {host} is reachable from other machines: set --token (or "
                         "ATLAS_JAX_TOKEN) so that requests must carry it")


def make_server(service: LedgerService, host: str = "127.0.0.1", port: int = 0,
                token: str | None = None) -> ThreadingHTTPServer:
    """A threading HTTP server for `service` (port 0: any free port)."""
    check_host(host, token)
    server = ThreadingHTTPServer((host, port), make_handler(service, token))
    server.daemon_threads = True
    return server


# ----------------------------------------------------------------------------- command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", dest="run_dir", required=True,
                        help="the folder `atlas-jax demo --out` wrote")
    parser.add_argument("--ledger", required=True, help="the Beancount file to answer from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--token", default=os.environ.get("ATLAS_JAX_TOKEN"),
                        help="required of requests (default: $ATLAS_JAX_TOKEN)")
    parser.add_argument("--poll", type=float, default=0.5,
                        help="seconds between checks of the ledger files")
    parser.add_argument("--min_confidence", type=float, default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from atlas_jax.ledger.qa import DEFAULT_MIN_CONFIDENCE, LedgerQA
    try:
        check_host(args.host, args.token)          # before minutes of loading
        qa = LedgerQA.load(args.run_dir, args.min_confidence or DEFAULT_MIN_CONFIDENCE)
        service = LedgerService(qa, args.ledger, args.poll)
        report = service.sync()
        if report is None:
            raise ValueError(service.last_sync_error)
        service.warm_up()
        server = make_server(service, args.host, args.port, args.token)
    except (ValueError, OSError) as e:
        print(f"atlas-jax serve: {e}", file=sys.stderr)
        return 2
    service.start_watching()
    host, port = server.server_address[:2]
    print(f"atlas-jax serve: {report['entries']} entries of {args.ledger} "
          f"(index version {qa.holder.version}); http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
        server.server_close()
    return 0
