"""The search page of the Serve app (serve/static/) in headless Chromium, against the real app.

Debian's chromium + chromedriver (.ci/run installs them) driven by selenium; skipped where
either is missing. The `served_app` fixture (tests/conftest.py) gives the running app's `.url`,
`.image_path` (a PNG of a gallery image to upload) and `.gallery_ids`.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30
TEXT = "the same, but blue"

pytestmark = pytest.mark.timeout(300)

# The results of the latest search, once every thumbnail has loaded: [{id, rank, score}], or
# null while a search runs or older results (marked data-old) are still on the page.
RESULTS_READY_JS = """
const items = [...document.querySelectorAll('#results .result')];
if (!items.length || items.some(r => r.dataset.old)) return null;
if (document.getElementById('results').getAttribute('aria-busy')) return null;
const imgs = items.map(r => r.querySelector('img'));
if (!imgs.every(i => i && i.complete && i.naturalWidth > 0)) return null;
return items.map(r => ({id: r.dataset.imageId, rank: r.querySelector('.rank').textContent,
                        score: r.querySelector('.score').textContent}));
"""
GALLERY_READY_JS = """
const imgs = [...document.querySelectorAll('#gallery .thumb img')];
return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0;
"""


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the test extra)")
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)   # with the Service below: selenium-manager downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver, element_id):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def wait(driver, condition, message, timeout=WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, message)


def open_page(driver, url):
    driver.get(url)
    wait(driver, lambda d: d.execute_script(GALLERY_READY_JS), "no gallery thumbnails loaded")
    wait(driver, lambda d: by_id(d, "info").text.startswith("Encoder"), "no /info line in the header")


def wait_results(driver):
    def ready(d):
        error = by_id(d, "error")
        if error.is_displayed():
            raise AssertionError(f"the page shows an error instead of results: {error.text!r}")
        return d.execute_script(RESULTS_READY_JS)

    return wait(driver, ready, "no results with loaded thumbnails")


def search(driver):
    """Clicks Search and waits for the new results (the old ones are marked first)."""
    driver.execute_script("document.querySelectorAll('#results .result').forEach(r => r.dataset.old = '1')")
    by_id(driver, "search").click()
    return wait_results(driver)


def set_value(driver, element_id, value):
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(str(value))


def query_of(url):
    return {key: values[0] for key, values in parse_qs(urlparse(url).query).items()}


def severe_logs(driver):
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_search_page_upload_refine_reload_download(browser, served_app, tmp_path):
    open_page(browser, served_app.url + "/")
    k = min(5, len(served_app.gallery_ids))

    # 1. upload a gallery image as the reference, type a modification, search
    by_id(browser, "upload").send_keys(str(Path(served_app.image_path).resolve()))
    wait(browser, lambda d: by_id(d, "reference-chosen").is_displayed(), "the upload is not shown as the reference")
    assert by_id(browser, "upload-note").is_displayed(), "no small print that an upload cannot live in the URL"
    assert by_id(browser, "download").get_attribute("disabled") is not None, "Download enabled before any results"
    set_value(browser, "k", k)
    set_value(browser, "text", TEXT)
    results = search(browser)
    assert len(results) == k
    assert [r["rank"] for r in results] == [f"#{i}" for i in range(1, k + 1)]
    assert all(re.fullmatch(r"-?\d+\.\d{3}", r["score"]) for r in results), results
    assert {r["id"] for r in results} <= set(served_app.gallery_ids)
    assert "results in" in by_id(browser, "status").text and " ms" in by_id(browser, "status").text
    assert query_of(browser.current_url).get("upload") == "1"

    # 2. a result becomes the next reference; the text stays for the next modification
    chosen = results[min(1, k - 1)]["id"]
    browser.find_element("css selector", f'#results .result[data-rank="{min(2, k)}"] .card').click()
    assert by_id(browser, "text").get_attribute("value") == TEXT
    assert not by_id(browser, "upload-note").is_displayed()
    wait(browser, lambda d: d.execute_script(
        "const i = document.getElementById('reference-img');"
        "return i.complete && i.naturalWidth > 0 && i.getAttribute('src') === '/images/' + encodeURIComponent(arguments[0]);",
        chosen), "the clicked result is not shown as the reference")
    refined = search(browser)
    assert len(refined) == k
    query = query_of(browser.current_url)
    assert "image_id=" in browser.current_url
    assert query == {"image_id": chosen, "text": TEXT, "k": str(k), "dedupe": "false"}, query

    # 3. the query lives in the URL: a reload runs it again
    browser.refresh()
    assert wait_results(browser) == refined
    assert by_id(browser, "text").get_attribute("value") == TEXT
    assert by_id(browser, "k").get_attribute("value") == str(k)
    wait(browser, lambda d: d.execute_script(GALLERY_READY_JS), "no gallery after the reload")

    # 4. Download JSON saves the last answer
    download = by_id(browser, "download")
    assert download.is_enabled()
    download.click()
    saved = browser.downloads / "cir-search.json"
    wait(browser, lambda d: saved.exists() and saved.stat().st_size > 0, "no cir-search.json downloaded")
    answer = json.loads(saved.read_text())
    assert [r["image_id"] for r in answer["results"]] == [r["id"] for r in refined]
    assert answer["query"]["image_id"] == chosen and set(answer["timing_ms"]) >= {"encode", "search", "total"}

    shots = Path(os.environ.get("CIR_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "serve-page.png"))
    assert severe_logs(browser) == []


def test_search_page_shows_errors_and_recovers(browser, served_app, tmp_path):
    open_page(browser, served_app.url + "/")
    error = by_id(browser, "error")
    assert not error.is_displayed()

    # k out of bounds
    set_value(browser, "text", TEXT)
    set_value(browser, "k", 0)
    by_id(browser, "search").click()
    wait(browser, lambda d: error.is_displayed() and error.text.strip(), "no error shown for k=0")
    assert by_id(browser, "results").find_elements("css selector", ".result") == []

    # a file that is not an image: the server's error message is shown
    not_image = tmp_path / "not-an-image.png"
    not_image.write_text("this is plain text, not a PNG\n")
    set_value(browser, "k", 3)
    by_id(browser, "upload").send_keys(str(not_image))
    by_id(browser, "search").click()
    wait(browser, lambda d: error.is_displayed() and error.text.strip() and "k must" not in error.text,
         "no error shown for an upload that is not an image")
    assert by_id(browser, "status").text == ""

    # the page still works: a gallery image as the reference, and Enter in the text box, give results
    from selenium.webdriver.common.keys import Keys

    browser.find_element("css selector", "#gallery .thumb").click()
    by_id(browser, "text").send_keys(Keys.ENTER)
    assert len(wait_results(browser)) == 3
    assert not error.is_displayed()
