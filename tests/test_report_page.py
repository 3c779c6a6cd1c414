"""`harness report --format html` in a real headless browser (Debian's chromium + chromium-driver,
driven by selenium): the page loads with no console errors, every image decodes, the tables hold
the registry's numbers, every run link reaches the run's section, and a screenshot is a real picture.
One browser serves the whole module. Without chromium the browser tests skip, saying so; on CI
(`$CI` set) a missing browser is a failure, since `.ci/run` installs it."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.registry import Registry
from tests.test_report import seed_registry

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists()
                                                 else None)
VIEWPORT = (1000, 700)


def add_bcl_run(reg: Registry) -> int:
    """A done BCL-D run as the trainer now records one: class counts in its config, per-class BCL
    weights in its epoch rows, per-class probe accuracy."""
    counts = [int(500 * 0.01 ** (c / 99)) for c in range(100)]
    rid = reg.create_run("bcl-d", "split1", 10, 3, {"class_counts": counts, "split_sha256": "ab" * 32},
                         status="done", device="NVIDIA H200", versions={"precision": "bf16", "torch": "2.14.1"})
    reg.update_run(rid, wall_time_s=30.0, epochs_done=3)
    for ep in (1, 2, 3):
        reg.log_epoch(rid, ep, loss=6.0 - ep, images_per_s=30000.0 + ep, weight_q10=0.1, weight_q25=0.2,
                      weight_q50=0.4, weight_q75=0.6, weight_q90=0.8,
                      weight_by_class=[0.2 + 0.5 * c / 99 + 0.01 * ep for c in range(100)])
    reg.log_probe(rid, "full", 0, 58.25, many=65.0, medium=58.0, few=50.0, std=6.13,
                  per_class=[70 - 0.3 * c for c in range(100)])
    return rid


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """(registry, path of the page the CLI wrote)."""
    folder = tmp_path_factory.mktemp("page")
    reg = seed_registry(f"sqlite:///{folder / 'r.db'}")
    add_bcl_run(reg)
    out = folder / "report.html"
    r = CliRunner().invoke(app, ["report", "--registry", reg.url, "--format", "html", "--out", str(out),
                                 "--data-root", str(folder / "nodata")])
    assert r.exit_code == 0, r.output
    return reg, out


@pytest.fixture(scope="module")
def browser():
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver (chromium-driver)", CHROMEDRIVER)) if not p]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        reason = f"no headless browser: {', '.join(missing)} missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests; {reason}")
        pytest.skip(reason)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # selenium sends nothing anywhere
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                "--force-device-scale-factor=1", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def load(driver, path: Path) -> list[dict]:
    """Open the page; the console entries it produced."""
    driver.get(path.resolve().as_uri())
    return driver.get_log("browser")


def errors(entries: list[dict]) -> list[str]:
    return [e["message"] for e in entries if e["level"] == "SEVERE"]


IMAGES_JS = "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"


# -- without a browser ----------------------------------------------------------------------------

def test_page_is_self_contained(page):
    from PIL import Image

    _, path = page
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in html.split("</head>")[0]
    assert "Content-Security-Policy" in html and "<script" not in html
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith(("data:image/png;base64,", "#")) for r in refs), \
        [r[:40] for r in refs if not r.startswith(("data:", "#"))]
    pngs = [r for r in refs if r.startswith("data:")]
    assert len(pngs) == 4  # per-class accuracy, groups, training curves, BCL weight vs class size
    for uri in pngs:
        img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert img.format == "PNG" and min(img.size) > 100


# -- in the browser -------------------------------------------------------------------------------

def test_page_loads_without_console_errors_and_every_image_decodes(browser, page):
    _, path = page
    entries = load(browser, path)
    assert errors(entries) == [], entries
    assert browser.title == "BCL harness report"
    images = browser.execute_script(IMAGES_JS)
    assert len(images) == 4
    for complete, w, h, alt in images:
        assert complete and w > 100 and h > 100, (alt, w, h)


def test_the_checks_catch_a_broken_page(browser, page, tmp_path):
    """A page that reaches for the network (blocked by its policy) or embeds a broken image fails both
    checks: the tests above can fail."""
    _, path = page
    html = path.read_text(encoding="utf-8").replace(
        "<h1>", '<img src="https://example.invalid/x.png" alt="remote"><img src="data:image/png;base64,AAAA" '
                'alt="broken"><h1>', 1)
    bad = tmp_path / "bad.html"
    bad.write_text(html, encoding="utf-8")
    entries = load(browser, bad)
    assert any("Content Security Policy" in m or "example.invalid" in m for m in errors(entries)), entries
    widths = {alt: w for _, w, _, alt in browser.execute_script(IMAGES_JS)}
    assert widths["remote"] == 0 and widths["broken"] == 0


def cells(driver, table_id: str) -> list[list[str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))"
        ".map(r => Array.from(r.cells).map(c => c.textContent))", f"#{table_id}")


def test_tables_hold_the_registry_numbers(browser, page):
    """Worked out from the registry's raw probe rows here, not through the report's own frames."""
    reg, path = page
    load(browser, path)
    t1 = {r[0]: r for r in cells(browser, "table1")}
    done = {r["id"]: r for r in reg.list_runs(status="done")}
    full = {m: [p["top1"] for rid, r in done.items() if r["method"] == m for p in reg.probes(rid) if p["kind"] == "full"]
            for m in ("simclr", "sdclr", "bcl-d")}
    for label, m in (("SimCLR", "simclr"), ("SDCLR", "sdclr")):  # one run per split: mean ± sample std
        v = np.array(full[m])
        assert t1[label][1] == f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})"
        assert t1[label][2] == {"SimCLR": "50.7", "SDCLR": "55.0"}[label]
    # BCL-D: one run, no std; the difference to the published 58.7
    assert t1["BCL-D"][1] == f"{full['bcl-d'][0]:.2f} (n=1)" and t1["BCL-D"][3] == f"{full['bcl-d'][0] - 58.7:+.2f}"
    assert t1["BCL-I"][1] == "— (no done runs)"
    t2 = {r[0]: r for r in cells(browser, "table2")}
    # Std (balance): the population std of the run's three group accuracies
    assert t2["BCL-D"][1:6] == ["65.00", "58.00", "50.00", f"{np.std([65.0, 58.0, 50.0]):.2f}", "58.25"]
    t3 = {r[0]: r for r in cells(browser, "table3")}
    spent = sum(r["wall_time_s"] for r in reg.list_runs() if r["device"] and not r["device"].startswith("cpu"))
    assert t3["All"][3] == f"{spent / 3600:.2f}"
    assert t3["BCL-D"][5] == "30,002"  # median images/s of its three epochs
    env = cells(browser, "table4")
    assert ["GPU / device", "NVIDIA H200"] in [r[:2] for r in env]
    assert any(r[0] == "GPU driver" and r[1] == "not recorded" for r in env)


def test_every_run_link_reaches_the_runs_section(browser, page):
    reg, path = page
    load(browser, path)
    hrefs = browser.execute_script("return Array.from(document.querySelectorAll('table a')).map(a => a.hash)")
    assert "#run-1" in hrefs and len(hrefs) > 10
    sections = set(browser.execute_script(
        "return Array.from(document.querySelectorAll('section.run')).map(s => '#' + s.id)"))
    assert sections == {f"#run-{r['id']}" for r in reg.list_runs()}
    assert set(hrefs) <= sections
    link = browser.find_element("css selector", "#table1 a[href='#run-2']")
    link.click()
    assert browser.execute_script("return location.hash") == "#run-2"
    heading = browser.execute_script("return document.querySelector('#run-2 h3').textContent")
    assert heading.startswith("Run #2: SimCLR on split2")


def test_screenshot_is_a_picture_of_the_page(browser, page):
    from PIL import Image

    _, path = page
    load(browser, path)
    inner = browser.execute_script("return [window.innerWidth, window.innerHeight]")
    img = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert img.size == tuple(inner)
    px = np.asarray(img)
    assert px.std() > 10  # not one flat colour
    dark = (px.sum(axis=2) < 200).mean()
    assert 0.002 < dark < 0.5  # text on a light page
