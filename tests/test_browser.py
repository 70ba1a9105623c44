"""The pages people open, in a real headless browser (Debian's chromium, driven by
selenium through chromium-driver; nothing is downloaded): serve.py's upload page shows the
verdict and the pictures of an uploaded image, and a run's report.html and
report/CLASS/index.html load every image. Skipped where chromium is not installed
(.ci/run installs it)."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.runtime import child_environment

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_service import Server  # noqa: E402

CRACK = os.path.join(ROOT, "sample_data", "bottle", "test", "crack", "000.png")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--allow-file-access-from-files"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small training run with its report, exported."""
    out = str(tmp_path_factory.mktemp("browser_run"))
    flags = ["--data_dir", os.path.join(ROOT, "sample_data"), "--cls", "bottle", "--arch", "resnet18",
             "--image_size", "64", "--teacher_weights", "none", "--batch_size", "3", "--output_dir", out]
    for command in ([os.path.join(ROOT, "main.py"), *flags, "--epochs", "2"],
                    [os.path.join(ROOT, "export_model.py"), "--output_dir", out]):
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, env=child_environment(), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def images_loaded(driver) -> list[tuple[str, int]]:
    """(src, naturalWidth) of every image of the page, once it has finished loading."""
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))
    return driver.execute_script("return Array.from(document.images).map(i => [i.src, i.naturalWidth])")


def test_the_upload_page_shows_verdict_and_pictures(run, browser):
    server = Server(os.path.join(run, "inference", "bottle"))
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        assert "resnet18, class bottle, 64 px" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "file").send_keys(CRACK)
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                         or d.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "error").text == ""
        assert browser.find_element(By.ID, "verdict").text in ("OK", "DEFECT")
        assert browser.find_element(By.ID, "score").text.startswith("score ")
        shown = dict(images_loaded(browser))
        # one picture, whose last panel is the predicted mask: the mask is shown once
        assert len(shown) == 1 and all(width > 0 for width in shown.values()), shown
        picture = browser.find_element(By.ID, "picture")
        assert picture.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", picture) > 64
    finally:
        assert server.stop() == 0


def test_report_pages_load_every_image(run, browser):
    """report.html holds the tables and a link per class (no images of its own): the link
    is followed in the browser, and the class page loads every one of its images."""
    browser.get("file://" + os.path.join(run, "report.html"))
    assert images_loaded(browser) == []
    browser.find_element(By.CSS_SELECTOR, 'a[href="report/bottle/index.html"]').click()
    WebDriverWait(browser, 30).until(lambda d: d.current_url.endswith("report/bottle/index.html"))
    shown = images_loaded(browser)
    names = sorted(os.path.basename(src) for src, _ in shown)
    assert {"roc_image.png", "roc_pixel.png", "pro.png"} <= set(names), names
    assert all(width > 0 for _, width in shown), [src for src, width in shown if not width]
