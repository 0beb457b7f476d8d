"""The review page in headless Chromium (Debian's chromium + chromium-driver): filters, paging, decisions, export,
and the relabel round trip of the exported decisions. Run with: pytest -m browser."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from artdist.cli import main as cli_main
from artdist.outliers import pipeline, ranking

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_SOFTMAX = ranking.RANKED_SCORES[0]  # 1 - max softmax, the seed projects' rule
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver; "
                ".ci/run installs them)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select  # noqa: E402
from test_outliers import SPLIT, page_data, probed  # noqa: E402,F401  (probed: the module-scoped fixture)


@pytest.fixture(scope="module")
def report(probed, tmp_path_factory) -> Path:  # noqa: F811
    """outliers/val/ of the probed model, with the planted list known."""
    cfg, manifest, _, _, scores = probed
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path_factory.mktemp("run")))
    pipeline.write_reports(scores, cfg, manifest, SPLIT, ranking.read_planted(cfg.outliers.planted))
    return Path(cfg.out_dir) / "outliers" / SPLIT


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


def count(driver) -> tuple[int, int]:
    el = driver.find_element(By.ID, "count")
    return int(el.get_attribute("data-matching")), int(el.get_attribute("data-shown"))


def cards(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "article.card")


def errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_filters_decides_exports_and_the_decisions_relabel_the_shards(report, browser, probed, tmp_path):
    _, manifest, _, _, _ = probed
    data = page_data(report / "index.html")
    rows = data["rows"]
    browser.get((report / "index.html").as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    assert errors(browser) == []
    assert browser.title == data["title"]
    assert count(browser) == (len(rows), min(50, len(rows)))
    assert len(cards(browser)) == min(50, len(rows))
    assert browser.find_element(By.ID, "quality-table").text.count("AUROC") == len(data["quality"])
    # filter: one task, then one class of it; the count is what the data says
    Select(browser.find_element(By.ID, "f-task")).select_by_value("style")
    style = [r for r in rows if r["task"] == "style"]
    assert count(browser)[0] == len(style)
    assert {c.get_attribute("data-task") for c in cards(browser)} == {"style"}
    cls = max({r["assigned"] for r in style}, key=lambda c: (sum(r["assigned"] == c for r in style), c))
    Select(browser.find_element(By.ID, "f-assigned")).select_by_value(cls)
    assert count(browser)[0] == sum(r["assigned"] == cls for r in style)
    Select(browser.find_element(By.ID, "f-assigned")).select_by_value("")
    # ranking + score range: max_softmax score (1 - max p) at least 0.5
    Select(browser.find_element(By.ID, "f-ranking")).select_by_value(MAX_SOFTMAX)
    browser.find_element(By.ID, "f-min").send_keys("0.5")
    assert count(browser)[0] == sum(r["scores"][MAX_SOFTMAX] >= 0.5 for r in style)
    shown = [int(c.get_attribute("data-id")) for c in cards(browser)]
    by_id = {r["id"]: r for r in style}
    assert [by_id[i]["ranks"][MAX_SOFTMAX] for i in shown] == sorted(by_id[i]["ranks"][MAX_SOFTMAX] for i in shown)
    browser.find_element(By.ID, "f-min").send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)  # fires 'input', as typing does
    assert count(browser)[0] == len(style)
    planted = browser.find_element(By.ID, "f-planted")
    planted.click()
    assert count(browser)[0] == sum(r["planted"] for r in style) > 0
    assert all(c.find_elements(By.CSS_SELECTOR, ".tag.planted") for c in cards(browser))
    planted.click()
    Select(browser.find_element(By.ID, "f-ranking")).select_by_value("combined")

    # decisions: wrong (with the model's class suggested, then another), fine, unsure, one undone, one on page 2
    Select(browser.find_element(By.ID, "f-pagesize")).select_by_value("25")
    first = cards(browser)
    ids = [int(c.get_attribute("data-id")) for c in first[:4]]
    first[0].find_element(By.CSS_SELECTOR, "button[data-decision=wrong]").click()
    suggestion = next(c for c in manifest.classes["style"] if c not in (by_id[ids[0]]["assigned"],
                                                                           by_id[ids[0]]["predicted"]))
    Select(cards(browser)[0].find_element(By.CSS_SELECTOR, "select.suggest")).select_by_value(suggestion)
    cards(browser)[1].find_element(By.CSS_SELECTOR, "button[data-decision=fine]").click()
    cards(browser)[2].find_element(By.CSS_SELECTOR, "button[data-decision=unsure]").click()
    cards(browser)[3].find_element(By.CSS_SELECTOR, "button[data-decision=wrong]").click()
    cards(browser)[3].find_element(By.CSS_SELECTOR, "button[data-decision=wrong]").click()  # undone
    marked = {ids[0]: ("wrong", suggestion), ids[1]: ("fine", ""), ids[2]: ("unsure", "")}
    if len(style) > 25:
        browser.find_element(By.CSS_SELECTOR, "#pager-top button.next").click()
        page2 = cards(browser)[0]
        i = int(page2.get_attribute("data-id"))  # each decision redraws the cards
        page2.find_element(By.CSS_SELECTOR, "button[data-decision=wrong]").click()
        default = by_id[i]["predicted"] if by_id[i]["predicted"] != by_id[i]["assigned"] else ""
        marked[i] = ("wrong", default)
    assert "decided-wrong" in cards(browser)[0].get_attribute("class")
    Select(browser.find_element(By.ID, "f-decision")).select_by_value("wrong")
    assert count(browser)[0] == sum(d == "wrong" for d, _ in marked.values())
    Select(browser.find_element(By.ID, "f-decision")).select_by_value("")

    # kept across a reload, then exported: exactly the marked rows
    browser.refresh()
    assert "recorded" in browser.find_element(By.ID, "decided").text
    browser.find_element(By.ID, "export").click()
    exported = browser.downloads / f"decisions_{SPLIT}.csv"
    for _ in range(100):
        if exported.exists() and not list(browser.downloads.glob("*.crdownload")):
            break
        time.sleep(0.1)
    with open(exported, newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    paths = {int(i): p for i, p in data["paths"].items()}
    expect = [{"path": paths[i], "task": "style", "assigned": by_id[i]["assigned"], "decision": d,
               "suggested_label": s} for i, (d, s) in marked.items()]
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(got, key=key) == sorted(expect, key=key)

    # the enlarged view loads the shard's own picture from images/
    first_id = cards(browser)[0].get_attribute("data-id")
    cards(browser)[0].find_element(By.CSS_SELECTOR, "img.thumb").click()
    assert browser.find_element(By.ID, "viewer").is_displayed()
    shown_src, width = browser.execute_script(
        "const i = document.getElementById('viewer-img'); return [i.currentSrc, i.naturalWidth]")
    assert shown_src == (report / data["large"][first_id]).as_uri()
    with Image.open(report / data["large"][first_id]) as img:
        assert width == img.width
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert not browser.find_element(By.ID, "viewer").is_displayed()
    shot = tmp_path / "review.png"
    Select(browser.find_element(By.ID, "f-task")).select_by_value("")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("ARTDIST_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ARTDIST_SCREENSHOT"])
    assert errors(browser) == []

    # round trip: the export relabels a copy of the shards, recorded in its manifest
    shards = Path(probed[0].data.shards)
    new = tmp_path / "relabelled"
    assert cli_main(["relabel", str(exported), "--shards", str(shards), "--out", str(new)]) == 0
    record = json.loads((new / "manifest.json").read_text())["relabels"][-1]
    applied = {(c["path"], c["to"]) for c in record["corrections"]}
    assert applied == {(paths[i], s) for i, (d, s) in marked.items() if d == "wrong" and s}
    labels = {}
    for tar_path in new.glob(f"{SPLIT}-*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    labels[meta["path"]] = manifest.classes["style"][meta["style"]]
    for path, to in applied:
        assert labels[path] == to


def test_paintings_filed_under_several_classes_have_their_own_section(report, browser):
    """Rows whose prediction is another copy's label leave the likely mislabels for their own section."""
    from artdist.outliers.review import render_page

    data = page_data(report / "index.html")
    several = {(r["task"], r["id"]) for r in data["rows"][1:6:2]}  # three rows, not the top one
    for r in data["rows"]:
        if (r["task"], r["id"]) in several:
            r["several_classes"], r["copy_labels"] = True, [r["predicted"]]
    page = report / "copies.html"  # beside index.html: the same enlarged images
    page.write_text(render_page(data), encoding="utf-8")
    browser.get(page.as_uri())
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    Select(browser.find_element(By.ID, "f-pagesize")).select_by_value("200")
    section = Select(browser.find_element(By.ID, "f-section"))
    assert section.first_selected_option.get_attribute("value") == "mislabel"  # the default
    shown = {(c.get_attribute("data-task"), int(c.get_attribute("data-id"))) for c in cards(browser)}
    assert count(browser)[0] == len(data["rows"]) - 3 and not shown & several
    section.select_by_value("several")
    assert {(c.get_attribute("data-task"), int(c.get_attribute("data-id"))) for c in cards(browser)} == several
    for card in cards(browser):
        assert card.find_element(By.CSS_SELECTOR, ".tag.several").text == "filed under several classes"
        assert "not a likely mislabel" in card.find_element(By.CSS_SELECTOR, ".copies").text
    section.select_by_value("")
    assert count(browser)[0] == len(data["rows"])
    assert errors(browser) == []
