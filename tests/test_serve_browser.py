"""The search page in a real browser: headless Chromium, driven by selenium, against a real server.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them where it can); skipped
with that reason where they are missing. TSHSR_SCREENSHOT=docs/serve.png keeps the screenshot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from matching.config import EvaluationSettings
from matching.data.captions import group_by_image, read_captions
from matching.retrieval.search import SearchEngine
from tests.serve_helpers import free_port, start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
# Chromium's background services try the network, which this closed machine refuses.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


def chromium_or_skip(profile: Path):
    """A headless Chromium driven by selenium, or a skip that says what is missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"headless Chromium is not installed ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def save_screenshot(driver, path: Path) -> None:
    """The browser's screenshot as a 256-colour PNG (a fifth of the size, for the README)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(driver.get_screenshot_as_png())) as shot:
        shot.convert("RGB").quantize(256).save(path, optimize=True)


def known_pair(features: Path, captions: Path, ckpt: Path) -> tuple[str, list[str]]:
    """A test image and two of its captions that each find it first among the test images."""
    engine = SearchEngine.open(ckpt, features, captions=captions, device="cpu",
                               settings=EvaluationSettings(split="test"))
    groups = group_by_image(read_captions(captions, "test"))
    for image_id, group in groups.items():
        first = [c.text for c in group if engine.search_text(c.text, 1).hits[0].item == image_id]
        if len(first) >= 2:
            return image_id, first[:2]
    raise AssertionError("no test image is found first by two of its captions: the toy model did not learn")


def test_the_page_finds_the_known_image_draws_its_boxes_and_shows_its_captions(trained_toy, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from pipelines.synthetic import make_scenes, render_scene

    features, captions, _, ckpt, _ = trained_toy
    driver = chromium_or_skip(tmp_path / "profile")
    try:
        image_id, (query, second) = known_pair(features, captions, ckpt)
        own = {c.text for c in read_captions(captions, "test") if c.image_id == image_id}
        images = tmp_path / "images"
        images.mkdir()
        for scene in make_scenes(150, seed=1):  # the toy fixture's scenes; its features say 64 × 64 pixels
            if scene.split == "test":
                render_scene(scene, size=64).save(images / scene.image_id)
        port = free_port()
        server = start_server(["--checkpoint", str(ckpt), "--features", str(features), "--captions", str(captions),
                               "--split", "test", "--images", str(images)], port)
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(f"http://127.0.0.1:{port}/")
            wait.until(lambda d: "15 images" in d.find_element(By.ID, "about").text)
            box = driver.find_element(By.ID, "query")
            box.send_keys(query, Keys.ENTER)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure.result"))
            first = driver.find_elements(By.CSS_SELECTOR, "#results figure.result")[0]
            assert first.get_attribute("data-image-id") == image_id
            assert first.find_element(By.CSS_SELECTOR, "figcaption").text.startswith("#1 · ")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#results figure.result")) == 10
            picture = first.find_element(By.CSS_SELECTOR, "img")
            wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                  picture) == 64)
            regions = first.find_elements(By.CSS_SELECTOR, "svg rect.region")
            labels = [label.text for label in first.find_elements(By.CSS_SELECTOR, "svg text")]
            assert len(regions) >= 1 and all(label.endswith("%") for label in labels) and len(labels) == len(regions)
            assert all(float(r.get_attribute("width")) > 0 for r in regions)
            assert regions[0].rect["width"] > 0  # drawn: the browser laid it out with a size

            first.click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li"))
            assert driver.find_element(By.ID, "detail-title").text == image_id
            marked = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#captions li.gt")]
            assert marked and all(text.endswith(" ✓") for text in marked)
            assert all(any(text.endswith(f"{caption} ✓") for caption in own) for text in marked)
            listed = {li.text for li in driver.find_elements(By.CSS_SELECTOR, "#own-captions li")}
            assert listed == own

            box.clear()
            box.send_keys(second)
            driver.find_element(By.ID, "add-round").click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .moves"))
            first = driver.find_elements(By.CSS_SELECTOR, "#results figure.result")[0]
            # each query alone ranks it first, so the mean of the two does too
            assert first.get_attribute("data-image-id") == image_id
            assert first.find_element(By.CSS_SELECTOR, ".moves").text == "rank per round: #1 → #1"
            assert [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#round-list li")] == [query, second]
            driver.find_elements(By.CSS_SELECTOR, "#results figure.result")[0].click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#captions li.gt"))
            wait.until(lambda d: d.execute_script(
                "return [...document.images].every((i) => i.complete && i.naturalWidth > 0)"))
            shot = Path(os.environ.get("TSHSR_SCREENSHOT") or tmp_path / "serve.png")
            save_screenshot(driver, shot)
            assert shot.stat().st_size > 10_000
        finally:
            code, _, err = stop_server(server)
        assert code == 0 and "Traceback" not in err, err
    finally:
        driver.quit()
