"""The Fava "Ask" page (atlas_jax.fava) on the quick demo's run: Fava itself is started on a
ledger that enables the extension; the page answers with evidence linking to Fava's entry
views, and renders in headless Chromium (Debian's `chromium`; that part skips without it)."""
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import NEW_ENTRY

pytest.importorskip("fava")
QUESTION = "Who did I pay 77.41 USD on 30 Dec 2022?"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=600):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.geturl(), response.read().decode()


@pytest.fixture(scope="module")
def fava_app(demo_run, tmp_path_factory):
    out, _ = demo_run
    ledger = tmp_path_factory.mktemp("fava") / "ledger.beancount"
    text = (out / "ledger" / "ledger.beancount").read_text()
    ledger.write_text(f'2000-01-01 custom "fava-extension" "atlas_jax.fava" '
                      f'"{{\'run\': \'{out}\'}}"\n' + text + NEW_ENTRY)
    port = _free_port()
    fava = Path(sys.executable).parent / "fava"
    process = subprocess.Popen([str(fava), "--host", "127.0.0.1", "--port", str(port),
                                str(ledger)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                _, landing, _ = _get(base + "/", timeout=10)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(process.stdout.read().decode()[-3000:])
                time.sleep(0.5)
        slug = urllib.parse.urlsplit(landing).path.strip("/").split("/")[0]
        yield base, slug
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_ask_page_answers_with_links_to_entries(fava_app):
    base, slug = fava_app
    page_url = f"{base}/{slug}/extension/AtlasAsk/?q=" + urllib.parse.quote(QUESTION)
    status, _, page = _get(page_url)
    assert status == 200 and 'id="answer"' in page and 'id="evidence"' in page, page[-2000:]
    assert "Zyxwv Bakery" in page                              # the entry is the evidence
    links = re.findall(r'href="(/[^"#]*/journal/)#context-([0-9a-f]+)"', page)
    assert links, "evidence entries link to Fava's entry views"
    assert _get(base + links[0][0])[0] == 200
    # the hash is Fava's own id of the evidence entry (its context API knows it)
    status, _, context = _get(f"{base}/{slug}/api/context?entry_hash={links[0][1]}")
    assert status == 200 and "Zyxwv Bakery" in context
    # the JSON endpoint, on the same code path
    request = urllib.request.Request(f"{base}/{slug}/extension/AtlasAsk/ask",
                                     data=json.dumps({"question": QUESTION}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read().decode())
    assert answer["answer_type"] == "payee" and answer["evidence"]
    assert "Zyxwv Bakery" in answer["evidence"][0]["text"]


def test_ask_page_in_headless_chromium(fava_app, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    base, slug = fava_app
    page_url = f"{base}/{slug}/extension/AtlasAsk/?q=" + urllib.parse.quote(QUESTION)
    _get(page_url)                                             # model loaded and compiled
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page_url], capture_output=True,
                         text=True, timeout=300)
    assert 'id="answer"' in dom.stdout, dom.stderr[-2000:]
    assert "Zyxwv Bakery" in dom.stdout and 'id="evidence"' in dom.stdout
    shot = tmp_path / "fava_ask.png"
    subprocess.run([browser, *flags, "--window-size=1280,1000", f"--screenshot={shot}",
                    page_url], capture_output=True, timeout=300)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
