"""/docs (Swagger UI) and /redoc (ReDoc) work offline: the pages and every
script, style sheet and icon they reference are served by the gateway itself.

Checked twice: over HTTP (every URL in the page's HTML is the gateway's own,
and each answers 200 with content), and in headless Chromium (the pages
render the API's title, and every resource the browser loaded came from the
gateway; this machine has no outside network, so a CDN reference would leave
the page blank).
"""
from __future__ import annotations

import asyncio
import re
from urllib.parse import urljoin, urlparse

import httpx
import pytest

from test_pages_browser import browser  # noqa: F401  (fixture: headless Chromium through Selenium)

TITLE = "SMTP relay gateway"
PAGES = ["/docs", "/redoc"]


async def _start(gateway_factory):
    h = await gateway_factory(None, http={"enabled": True, "address": "127.0.0.1", "port": 0})
    return f"http://127.0.0.1:{h.gw.http_port}"


def _references(html: str) -> list[str]:
    """URLs the page loads: src/href attributes and url: '...' in its script."""
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    refs += re.findall(r"""spec-url\s*=\s*["']([^"']+)["']""", html)
    return refs


@pytest.mark.parametrize("page", PAGES)
async def test_docs_page_and_its_assets_come_from_the_gateway(gateway_factory, page):
    base = await _start(gateway_factory)
    async with httpx.AsyncClient() as http:
        r = await http.get(base + page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        # the browser may load nothing from elsewhere (ReDoc's bundle would fetch its logo)
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "img-src 'self' data: blob:" in csp
        html = r.text
        assert TITLE in html
        assert not re.search(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", html), html
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        refs = _references(html)
        scripts = [u for u in refs if u.endswith(".js")]
        assert scripts, html                                   # the page does load its UI script
        assert "/openapi.json" in refs
        for ref in refs:
            url = urljoin(base + page, ref)
            assert urlparse(url).netloc == urlparse(base).netloc, url
            got = await http.get(url)
            assert got.status_code == 200, (url, got.status_code)
            assert len(got.content) > 1000, (url, len(got.content))
            if url.endswith(".js"):
                assert "javascript" in got.headers["content-type"]
                assert "cdn.jsdelivr.net" not in got.text and "unpkg.com" not in got.text
            elif url.endswith(".css"):
                assert got.headers["content-type"].startswith("text/css")
        spec = (await http.get(base + "/openapi.json")).json()
        assert spec["info"]["title"] == TITLE and "/healthz" in spec["paths"]


async def test_docs_pages_render_offline_in_chromium(browser, gateway_factory):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base = await _start(gateway_factory)
    origin = urlparse(base).netloc
    # Requests the page's Content-Security-Policy stopped before they left the browser.
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "window.__blocked = [];"
        "document.addEventListener('securitypolicyviolation', e => window.__blocked.push(e.blockedURI));")})

    def visit(page: str, title_css: str) -> tuple[str, list[str]]:
        browser.get(base + page)
        title = WebDriverWait(browser, 30).until(ec.visibility_of_element_located((By.CSS_SELECTOR, title_css)))
        text = title.text
        entries = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        blocked = set(browser.execute_script("return window.__blocked"))
        # what went out: every resource entry that the policy did not stop
        return text, [u for u in entries if u not in blocked]

    text, loaded = await asyncio.wait_for(asyncio.to_thread(visit, "/docs", ".swagger-ui .info .title"), 60)
    assert TITLE in text
    assert any(u.endswith("/swagger-ui-bundle.js") for u in loaded), loaded
    assert any(u.endswith("/openapi.json") for u in loaded), loaded
    assert all(urlparse(u).netloc == origin for u in loaded), loaded
    ops = await asyncio.to_thread(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR,
                                                                                   ".opblock-summary-path")])
    assert "/healthz" in ops, ops

    text, loaded = await asyncio.wait_for(asyncio.to_thread(visit, "/redoc", "h1"), 60)
    assert TITLE in text
    assert any(u.endswith("/redoc.standalone.js") for u in loaded), loaded
    assert all(urlparse(u).netloc == origin for u in loaded), loaded
