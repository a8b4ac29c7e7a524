"""The web page at /, end to end in a real headless browser (Debian's chromium + chromedriver,
driven by selenium) against the bundled Shapes model: upload, prompts, method, progress,
before/after and the download link."""

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from engine.serving.api import ServeSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):  # .ci/run installs them: missing there is a failure, not a skip
            raise RuntimeError("chromium / chromedriver not found; .ci/run installs Debian's chromium and "
                               "chromium-driver")
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def test_the_page_edits_an_image(live, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from engine.shapes import analyser, demo, world

    server = live(ServeSettings(model="shapes"))
    scene = tmp_path / "scene.png"
    Image.fromarray(world.render(demo.SCENE)).save(scene)
    driver = browser()
    try:
        driver.get(server.url + "/")
        driver.find_element(By.ID, "image").send_keys(str(scene))
        driver.find_element(By.ID, "source").send_keys("a large red circle in the center, on a white background")
        driver.find_element(By.ID, "target").send_keys("a large blue circle in the center, on a white background")
        Select(driver.find_element(By.ID, "method")).select_by_value("ledits++")
        driver.find_element(By.ID, "go").click()
        seen = set()

        def finished(d):
            status = d.find_element(By.ID, "status").text
            seen.add(status.split(":")[0])
            return status in ("done", "failed")

        WebDriverWait(driver, 180, poll_frequency=0.05).until(finished)
        assert driver.find_element(By.ID, "status").text == "done", driver.find_element(By.ID, "error").text
        assert {"invert", "edit"} & seen  # progress was shown
        src = driver.find_element(By.ID, "after").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        assert driver.find_element(By.ID, "download").get_attribute("href") == src
        assert driver.find_element(By.ID, "before").get_attribute("src").startswith("data:image/png")
        edited = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        assert analyser.describe(edited) == "a large blue circle in the center, on a white background"
        if os.environ.get("OVERPAINT_SCREENSHOT"):  # the README's picture
            driver.save_screenshot(os.environ["OVERPAINT_SCREENSHOT"])
    finally:
        driver.quit()
