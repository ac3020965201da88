"""The confirmation and unsubscribe pages in a real headless browser.

Chromium and chromedriver from the Debian packages (``chromium``,
``chromium-driver``), driven by Selenium (PyPI ``selenium``, which is given
the driver's path and so downloads nothing). The browser opens the link from
the mail, clicks the button and must show the result page; every page is
saved as a screenshot into the test's tmp_path.

Skips visibly without Chromium/Selenium, fails under CI=true.
"""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiosmtplib
import pytest

from conftest import need, without_faketime
from test_listmail_smtp import _check_relayed_copy, _list_message, _start
from test_registry_http import _link

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _have_selenium() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def browser(tmp_path, monkeypatch):
    need(Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(),
         "Chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    need(_have_selenium(), "the Python package selenium is not installed (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")          # Selenium Manager must never download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,800",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    # The browser's own clock does not matter here (the gateway's does, and it
    # runs in this process): under faketime it runs without it.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"),
                      env=without_faketime())
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """Sync browser steps, run in a thread so the gateway (on the test's
    event loop) keeps serving."""

    def __init__(self, driver, shots: Path):
        self.driver = driver
        self.shots = shots

    def open(self, url: str) -> None:
        self.driver.get(url)

    def click_button(self, label: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec
        from selenium.webdriver.support.ui import WebDriverWait

        from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

        before = self.driver.find_element(By.TAG_NAME, "html")
        button = self.driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']")
        assert button.is_displayed() and button.is_enabled()
        button.click()

        def replaced(_driver) -> bool:
            """The result page replaced the old one. While the browser is
            between the two documents, ChromeDriver may answer "Node with given
            id does not belong to the document" instead of a stale reference:
            that is the same fact, seen mid-navigation."""
            try:
                before.is_enabled()
            except StaleElementReferenceException:
                return True
            except WebDriverException as exc:
                return "does not belong to the document" in (exc.msg or "")
            return False

        WebDriverWait(self.driver, 15).until(replaced)
        WebDriverWait(self.driver, 15).until(ec.presence_of_element_located((By.TAG_NAME, "h1")))

    def seen(self) -> tuple[str, str]:
        """(heading, visible text) of the current page."""
        from selenium.webdriver.common.by import By

        return (self.driver.find_element(By.TAG_NAME, "h1").text,
                self.driver.find_element(By.TAG_NAME, "body").text)

    def buttons(self) -> list[str]:
        from selenium.webdriver.common.by import By

        return [b.text for b in self.driver.find_elements(By.TAG_NAME, "button") if b.is_displayed()]

    def screenshot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 3000, (path, len(data))
        return path


async def _in_browser(fn, *args):
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 60)


async def test_confirm_and_unsubscribe_pages_in_chromium(browser, gateway_factory, sink, tmp_path):
    h, base = await _start(gateway_factory, sink)
    registry = h.gw.registry
    lst = await registry.create_list("alice", name="Example News", list_id="news.example.com",
                                     senders=["news@example.com"], confirm_from="confirm@example.com")
    res = await registry.add_subscriber("alice", lst.id, "bob@example.org", source="browser test")
    assert res.confirmation == "sent"
    await sink.wait_for(1)
    confirm_url = _link(sink, "bob@example.org", full=True)
    page = Page(browser, tmp_path)

    # the confirmation link: a page with a button; opening it confirms nothing
    await _in_browser(page.open, confirm_url)
    heading, text = await _in_browser(page.seen)
    assert heading == "Confirm your subscription", text
    assert "Example News" in text and "b***@example.org" in text and "bob@example.org" not in text
    assert await _in_browser(page.buttons) == ["Confirm subscription"]
    await _in_browser(page.screenshot, "1-confirm-page")
    assert await registry.recipient_status(lst.id, "bob@example.org") == "pending"

    # click: the result page, and the subscription is confirmed with the browser's user agent
    await _in_browser(page.click_button, "Confirm subscription")
    heading, text = await _in_browser(page.seen)
    assert heading == "Subscription confirmed", text
    assert "is now subscribed to" in text and "Example News" in text
    await _in_browser(page.screenshot, "2-confirmed")
    assert await registry.recipient_status(lst.id, "bob@example.org") == "confirmed"
    sub = await registry.subscriber("alice", lst.id, "bob@example.org")
    assert "Chrome" in sub.confirmed_user_agent and sub.confirmed_ip == "127.0.0.1"

    # list mail through SMTP; the browser opens the https link of its List-Unsubscribe
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port(), timeout=10, start_tls=False,
                           local_hostname="client.test")
    await smtp.connect()
    await smtp.login("alice", "s3cret")
    message = _list_message()
    errors, _ = await smtp.sendmail("news@example.com", ["bob@example.org"], message)
    assert errors == {}
    await smtp.quit()
    await sink.wait_for(2)
    links = _check_relayed_copy(h, sink.messages[1], "bob@example.org", message, lst.list_id_header)

    await _in_browser(page.open, links["https"])
    heading, text = await _in_browser(page.seen)
    assert heading == "Unsubscribe", text
    assert "Example News" in text and "b***@example.org" in text
    assert await _in_browser(page.buttons) == ["Unsubscribe"]
    await _in_browser(page.screenshot, "3-unsubscribe-page")
    assert await registry.recipient_status(lst.id, "bob@example.org") == "confirmed"

    await _in_browser(page.click_button, "Unsubscribe")
    heading, text = await _in_browser(page.seen)
    assert heading == "You are unsubscribed", text
    assert "no more mail" in text and "Example News" in text
    await _in_browser(page.screenshot, "4-unsubscribed")
    assert await registry.recipient_status(lst.id, "bob@example.org") == "unsubscribed"

    # the same link opened again later says so, and offers no button
    await _in_browser(page.open, links["https"])
    heading, text = await _in_browser(page.seen)
    assert heading == "You are unsubscribed" and await _in_browser(page.buttons) == []
    await _in_browser(page.screenshot, "5-unsubscribed-again")

    # a damaged confirmation link gets a page that says so
    await _in_browser(page.open, confirm_url[:-4] + ("aaaa" if not confirm_url.endswith("aaaa") else "bbbb"))
    heading, text = await _in_browser(page.seen)
    assert heading == "This link is not valid" and "Nothing was changed" in text, text
    await _in_browser(page.screenshot, "6-bad-link")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "1-confirm-page.png", "2-confirmed.png", "3-unsubscribe-page.png", "4-unsubscribed.png",
        "5-unsubscribed-again.png", "6-bad-link.png"]
