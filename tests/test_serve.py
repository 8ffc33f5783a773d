"""`atlas-jax serve` on the quick demo's run: endpoints, malformed requests, the token, and
answers that go on (each from one index version) while the ledger file changes under it."""
import json
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest

from atlas_jax.ledger import serve
from tests.conftest import NEW_ENTRY

QUESTION = "How much did I pay Zyxwv Bakery on 30 Dec 2022?"


@pytest.fixture(scope="module")
def service(demo_run, tmp_path_factory):
    from atlas_jax.ledger.qa import LedgerQA
    out, _ = demo_run
    ledger = tmp_path_factory.mktemp("ledger") / "ledger.beancount"
    shutil.copy(out / "ledger" / "ledger.beancount", ledger)
    service = serve.LedgerService(LedgerQA.load(out), ledger, poll_seconds=0.2)
    assert service.sync()["entries"] > 0
    service.warm_up()
    server = serve.make_server(service, "127.0.0.1", 0, token=None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    service.start_watching()
    yield service, f"http://127.0.0.1:{server.server_address[1]}", ledger
    service.stop()
    server.shutdown()
    server.server_close()


def _request(url, body=None, method=None, headers=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_ask_health_metrics_and_page(service):
    _, url, _ = service
    status, body = _request(url + "/ask", {"question": "What was the balance of "
                                           "Assets:US:BofA:Checking on 2022-03-01?"})
    assert status == 200, body
    answer = json.loads(body)
    assert {"answer", "confidence", "low_confidence", "why_low", "answer_type", "filters",
            "evidence", "index_version", "seconds"} <= set(answer)
    assert answer["answer_type"] == "balance"
    assert all(e["location"].startswith("ledger.beancount:") for e in answer["evidence"])
    status, body = _request(url + "/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["entries"] > 0
    status, body = _request(url + "/metrics")
    assert status == 200 and "atlas_jax_index_entries " in body
    assert 'atlas_jax_ask_latency_seconds{phase="warm",quantile="0.5"}' in body
    metrics = json.loads(_request(url + "/metrics.json")[1])
    assert metrics["ask_latency_seconds"]["cold"]["count"] == 1
    status, page = _request(url + "/?q=" + urllib.request.quote("Who did I pay 4.00 USD on "
                                                                "2022-03-01?"))
    assert status == 200 and 'id="answer"' in page and 'id="evidence"' in page


@pytest.mark.parametrize("raw,status,message", [
    (b"not json", 400, "not JSON"), (b"[1, 2]", 400, "JSON object"),
    (b'{"q": "x"}', 400, "'question'"), (b'{"question": ""}', 400, "'question'"),
    (b'{"question": "How much?", "k": 0}', 400, "'k'"),
    (b'{"question": "How much?", "k": "5"}', 400, "'k'"),
    (json.dumps({"question": "x" * 2000}).encode(), 413, "longer"),
    (b"x" * (serve.MAX_BODY + 1), 413, "bytes")])
def test_malformed_requests_get_4xx(service, raw, status, message):
    _, url, _ = service
    got, body = _request(url + "/ask", raw=raw, method="POST")
    assert got == status and message in json.loads(body)["error"]


def test_wrong_path_and_method(service):
    _, url, _ = service
    assert _request(url + "/ask")[0] == 405
    assert _request(url + "/nope")[0] == 404
    assert _request(url + "/health", {"x": 1})[0] == 405
    assert _request(url + "/health")[0] == 200          # still serving


def test_token_required_off_loopback(service):
    svc, _, _ = service
    with pytest.raises(ValueError, match="--token"):
        serve.make_server(svc, "0.0.0.0", 0, token=None)
    server = serve.make_server(svc, "127.0.0.1", 0, token="s3cret")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _request(url + "/ask", {"question": QUESTION})[0] == 401
        assert _request(url + "/ask", {"question": QUESTION},
                        headers={"Authorization": "Bearer wrong"})[0] == 401
        assert _request(url + "/ask", {"question": QUESTION},
                        headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert _request(url + "/health")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_answers_go_on_while_the_ledger_changes(service):
    svc, url, ledger = service
    first_version = svc.qa.holder.version
    results, errors, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            status, body = _request(url + "/ask", {"question": QUESTION})
            if status != 200:
                errors.append(body)
            else:
                results.append((time.monotonic(), json.loads(body)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(2)
    with ledger.open("a") as f:
        f.write(NEW_ENTRY)
    saved = time.monotonic()
    found_at = None
    while time.monotonic() - saved < 60 and found_at is None:
        time.sleep(0.2)
        found_at = next((t for t, r in results if r["evidence"]
                         and "Zyxwv Bakery" in r["evidence"][0]["text"]), None)
    stop.set()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    assert found_at is not None and found_at - saved <= 10, "the edit was not searchable in 10 s"
    assert svc.qa.holder.version == first_version + 1
    assert any(t < saved for t, _ in results)                # answered before the change too
    for _, result in results:                                 # one version per answer
        new = any("Zyxwv Bakery" in e["text"] for e in result["evidence"])
        assert new == (result["index_version"] > first_version)
    health = json.loads(_request(url + "/health")[1])
    assert health["last_sync"]["added"] == 1 and health["index_version"] == first_version + 1


def test_a_broken_save_keeps_the_index(service):
    svc, url, ledger = service
    good = ledger.read_text()
    version = svc.qa.holder.version
    ledger.write_text(good + '\n2023-01-02 * "x" "y"\n  Assets:Nowhere  abc USD\n')
    deadline = time.monotonic() + 30
    while svc.last_sync_error is None and time.monotonic() < deadline:
        time.sleep(0.2)
    health = json.loads(_request(url + "/health")[1])
    assert health["status"] == "degraded" and f"{ledger}:" in health["last_sync_error"]
    assert _request(url + "/ask", {"question": QUESTION})[0] == 200
    assert svc.qa.holder.version == version
    ledger.write_text(good)
    deadline = time.monotonic() + 30
    while svc.last_sync_error is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(_request(url + "/health")[1])["status"] == "ok"


def test_fava_extension_can_ask_a_running_server(service):
    fava_extension = pytest.importorskip("atlas_jax.fava")
    _, url, _ = service
    extension = fava_extension.AtlasAsk(None, repr({"url": url}))
    answer = extension.answer(QUESTION)
    assert answer["answer_type"] == "amount" and answer["evidence"]
    with pytest.raises(ValueError, match="not reachable"):
        fava_extension.AtlasAsk(None, repr({"url": "http://127.0.0.1:9"})).answer(QUESTION)
    with pytest.raises(ValueError, match="configure"):
        fava_extension.AtlasAsk(None, "{}")
