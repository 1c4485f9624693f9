"""The gateway's status page in a real browser: `moeflow up` (gateway + one engine process,
tiny llama, API keys on) and headless Chromium over the DevTools protocol. The page needs an
admin key (with only flat keys, those are admin keys): the browser sends it as the Basic
password, and with it the page's own requests."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.status_page.chromium import open_page
from tests.platform_process import Platform, start_platform

MODEL = "tiny-status"
API_KEY = "status-page-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# What a user sees, read from the DOM: the model card and the three charts.
PAGE_STATE = """(() => {
  const model = document.querySelector('section.model[data-model="__MODEL__"]');
  const charts = {};
  for (const fig of document.querySelectorAll('figure.chart')) {
    charts[fig.dataset.metric] = {
      points: Number(fig.dataset.points), max: Number(fig.dataset.max),
      paths: [...fig.querySelectorAll('path.series')].map((p) => p.getAttribute('d')).join('|'),
      latest: fig.querySelector('.latest').textContent,
    };
  }
  return JSON.stringify({
    updates: Number(document.body.dataset.updates),
    text: document.body.innerText,
    model: model && {
      state: model.dataset.state,
      meta: model.querySelector('.meta').textContent,
      rows: [...model.querySelectorAll('tbody tr')].map((r) => [r.dataset.role, r.dataset.state]),
    },
    charts,
  });
})()""".replace("__MODEL__", MODEL)


@pytest.fixture(scope="module")
def platform(tiny_dirs: dict[str, Path]) -> Iterator[Platform]:
    p = start_platform(tiny_dirs["llama"], ["--served-model-name", MODEL, "--max-model-len", "256",
                                            "--api-key", API_KEY])
    yield p
    p.stop()


def chat(platform: Platform, content: str, max_tokens: int = 12) -> None:
    r = httpx.post(f"{platform.base_url}/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text


def state(page: Any) -> dict[str, Any]:
    return dict(json.loads(page.evaluate(PAGE_STATE)))


def test_page_shows_the_running_model_and_its_charts_follow_requests(platform: Platform
                                                                      ) -> None:
    with open_page("about:blank") as page:
        # what a browser sends once the user typed the key into its Basic-auth prompt
        basic = base64.b64encode(f"status:{API_KEY}".encode()).decode()
        page.call("Network.enable")
        page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {basic}"})
        page.call("Page.navigate", url=f"{platform.root_url}/status")
        page.wait_for(f"!!document.querySelector('section.model[data-model=\"{MODEL}\"]')",
                      timeout_s=20, what=f"the model card of {MODEL}")
        page.wait_for("Number(document.body.dataset.updates) >= 2", timeout_s=20,
                      what="two polls of /status/data")
        before = state(page)
        assert MODEL in before["text"]
        assert before["model"]["state"] == "ready"
        assert before["model"]["rows"] == [["colocated", "healthy"]]
        assert "healthy" in before["text"] and "colocated" in before["text"]
        assert set(before["charts"]) == {"ttft_ms", "tpot_ms", "tokens_per_s"}

        for i in range(3):
            chat(platform, f"status page request {i}")

        page.wait_for(
            "(() => { const f = document.querySelector('figure.chart[data-metric=\"ttft_ms\"]');"
            f" return Number(f.dataset.points) > {before['charts']['ttft_ms']['points']}; }})()",
            timeout_s=20, what="a new TTFT point after the requests")
        page.wait_for(
            "Number(document.querySelector('figure.chart[data-metric=\"tokens_per_s\"]')"
            ".dataset.max) > 0", timeout_s=20, what="a non-zero tokens/s interval")
        after = state(page)

    assert after["updates"] > before["updates"]
    for metric in ("ttft_ms", "tpot_ms", "tokens_per_s"):
        assert after["charts"][metric]["paths"] != before["charts"][metric]["paths"], metric
        assert after["charts"][metric]["max"] > 0, metric
        assert after["charts"][metric]["latest"] != "latest –", metric
    assert after["charts"]["ttft_ms"]["points"] > before["charts"]["ttft_ms"]["points"]
    assert after["charts"]["tpot_ms"]["points"] > before["charts"]["tpot_ms"]["points"]
    requests_before = int(platform_requests(before["model"]["meta"]))
    assert int(platform_requests(after["model"]["meta"])) == requests_before + 3


def platform_requests(meta: str) -> str:
    """The request count in a model card's summary line ('... · 3 requests, ...')."""
    return meta.split(" requests")[0].rsplit("· ", 1)[1]


def test_status_needs_the_key_like_the_api(platform: Platform) -> None:
    refused = httpx.get(f"{platform.root_url}/status")
    assert refused.status_code == 401  # a browser asks for the key (Basic realm)
    assert 'Basic realm="moeflow admin"' in refused.headers.get_list("www-authenticate")
    assert httpx.get(f"{platform.root_url}/status/data").status_code == 401
    page = httpx.get(f"{platform.root_url}/status", headers=AUTH)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing external
    for asset, kind in (("status.js", "javascript"), ("status.css", "css")):
        r = httpx.get(f"{platform.root_url}/status/assets/{asset}", headers=AUTH)
        assert r.status_code == 200 and kind in r.headers["content-type"]
    missing = httpx.get(f"{platform.root_url}/status/assets/..%2Fapp.py", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{platform.base_url}/models").status_code == 401


def test_status_data_reports_instances_totals_and_windowed_series(platform: Platform) -> None:
    url = f"{platform.root_url}/status/data"
    first = httpx.get(url, headers=AUTH).json()
    chat(platform, "one more", max_tokens=6)
    time.sleep(0.6)  # the history keeps at most one sample per 0.5 s
    data = httpx.get(url, headers=AUTH).json()
    assert data["schema_version"] == 1
    (model,) = data["models"]
    assert model["name"] == MODEL and model["state"] == "ready"
    (role,) = model["roles"]
    assert role["role"] == "colocated" and role["num_healthy"] == 1
    (instance,) = role["instances"]
    assert instance["state"] == "healthy" and instance["url"].startswith("http://127.0.0.1:")
    assert model["totals"]["requests"] == first["models"][0]["totals"]["requests"] + 1
    assert model["totals"]["generation_tokens"] >= 6
    series = data["series"]
    assert len(series["t"]) == len(series["models"][MODEL]["tokens_per_s"]) >= 1
    assert series["t"] == sorted(series["t"])
    assert max(series["models"][MODEL]["tokens_per_s"]) > 0
