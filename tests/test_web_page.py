"""The gateway's web page in a real headless Chromium (Debian's package), driven by Playwright.

Digits are drawn with real pointer events (strokes along each row's ink, not a pasted bitmap) on a
phone-sized screen, and a photo-like file is uploaded; the labels the page shows are checked against
the truth and against the gateway's own answer for the very pixels drawn. Screenshots are kept in
runs/test-artifacts/.
"""

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, sync_playwright

from kdcontract.client_forms import ClientForm, render
from kdcontract.digits import digit_png_bytes
from loadtest.clients.measure import metric_value
from loadtest.clients.served_accuracy import held_out as served_held_out
from loadtest.clients.served_accuracy import served_split
from tests.conftest import ROOT

ARTIFACTS = ROOT / "runs" / "test-artifacts"
PHONE = {"width": 390, "height": 844}
MODELS = ("student", "teacher", "ensemble")
DRAWN = 6  # the first held-out digits, in split order (no choosing)
INK = 96  # grey level from which an 8x8 pixel is drawn as ink


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is missing: `make setup` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser, gateway) -> Page:
    context = browser.new_context(viewport=PHONE, device_scale_factor=2, has_touch=True, is_mobile=True)
    opened = context.new_page()
    opened.goto(f"{gateway.url}/")
    yield opened
    context.close()


def held_out(gateway) -> tuple[np.ndarray, np.ndarray]:
    digits, labels = served_held_out(served_split(gateway.client))
    return digits[:DRAWN], labels[:DRAWN]


def _runs(line: np.ndarray) -> list[np.ndarray]:
    inked = np.flatnonzero(line >= INK)
    return np.split(inked, np.flatnonzero(np.diff(inked) > 1) + 1) if inked.size else []


def draw(page: Page, digit: np.ndarray) -> None:
    """The digit's ink as pen strokes: each row's runs of ink across, then each column's down (a pen
    wider than a row's gap joins them, as a hand would)."""
    box = page.locator("#pad").bounding_box()
    cell = box["width"] / 8

    def at(row: float, col: float) -> tuple[float, float]:
        return box["x"] + (col + 0.5) * cell, box["y"] + (row + 0.5) * cell

    def stroke(start: tuple[float, float], end: tuple[float, float], cells: int) -> None:
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=max(2, 3 * cells))
        page.mouse.up()

    for row in range(8):
        for run in _runs(digit[row]):
            stroke(at(row, run[0] - 0.15), at(row, run[-1] + 0.15), len(run))
    for col in range(8):
        for run in _runs(digit[:, col]):
            if len(run) > 1:
                stroke(at(run[0], col), at(run[-1], col), len(run))


def cards(page: Page) -> dict[str, str]:
    return {m: page.locator(f'.card[data-model="{m}"] .top').inner_text() for m in MODELS}


def wait_for_answers(page: Page, count: int) -> dict[str, str]:
    page.wait_for_function(f"Number(document.body.dataset.classified || 0) >= {count}", timeout=30_000)
    return cards(page)


def wait_for_whole_drawing(page: Page) -> dict[str, str]:
    """The cards once they answer every stroke drawn: the page also classifies a drawing when the pen rests
    between strokes (as a slow machine's strokes do), and only the answer to the last stroke is the digit's."""
    page.wait_for_function("Number(document.body.dataset.answeredStrokes) === strokes", timeout=30_000)
    return cards(page)


def test_page_classifies_digits_drawn_with_pointer_strokes(page, gateway):
    digits, labels = held_out(gateway)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shown = []
    for n, (digit, label) in enumerate(zip(digits, labels, strict=True), start=1):
        page.click("#clear")
        draw(page, digit)
        answers = wait_for_whole_drawing(page)
        shown.append(answers)
        # The page shows exactly what the gateway answers for the pixels that were drawn.
        drawn_png = base64.b64decode(page.evaluate("pad.toDataURL('image/png')").split(",", 1)[1])
        for model, top in answers.items():
            direct = gateway.client.post(
                f"/v1/classify?model={model}", content=drawn_png, headers={"Content-Type": "image/png"}
            )
            assert direct.json()["predictions"][0]["top_k"][0]["label"] == top, (model, n)
        page.screenshot(path=str(ARTIFACTS / f"web-page-drawn-{n}-label-{label}.png"), full_page=True)
    for model in MODELS:
        correct = sum(s[model] == str(label) for s, label in zip(shown, labels, strict=True))
        assert correct >= DRAWN - 1, f"{model} read {correct} of {DRAWN} drawn digits: {[s[model] for s in shown]}"
    # The A/B arm this browser is sticky to, and the live summary, are on the page.
    assert page.locator("#arm").inner_text() != "–"
    page.wait_for_function("document.querySelectorAll('#abrows tr td').length > 1", timeout=10_000)
    assert "student" in page.locator("#abrows").inner_text()
    # A phone-sized screen: nothing wider than the viewport.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_page_classifies_an_uploaded_photo(page, gateway):
    digits, labels = held_out(gateway)
    photo = render(
        digits[0], ClientForm(size=480, resample="bicubic", encoding="JPEG", color="RGB", dark_on_light=True)
    )
    assert Image.open(io.BytesIO(photo)).size == (480, 480)
    page.set_input_files("#file", files=[{"name": "digit.jpg", "mimeType": "image/jpeg", "buffer": photo}])
    answers = wait_for_answers(page, 1)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-photo.png"), full_page=True)
    assert answers == dict.fromkeys(MODELS, str(labels[0]))
    assert "photo" in page.locator("#status").inner_text()


def test_page_draws_the_experiment_latency_per_arm_and_the_gates_intervals(page, gateway):
    for index in range(1500, 1530):  # A/B traffic for both arms of the session gateway's 70/30 split
        resp = gateway.client.post(
            "/v1/classify?model=auto", content=digit_png_bytes(index), headers={"Content-Type": "image/png"}
        )
        assert resp.status_code == 200, resp.text
    page.reload()
    # Drawn once a bar of each arm has a height: an empty bucket is a rect of height 0 (not "visible"), and which
    # bucket is empty depends on this machine's latencies.
    page.wait_for_function(
        """() => ['student', 'teacher'].every(arm => [...document.querySelectorAll(`#latency rect[data-arm="${arm}"]`)]
            .some(r => +r.getAttribute('height') > 0))""",
        timeout=30_000,
    )
    arms = set(page.eval_on_selector_all("#latency rect", "rects => rects.map(r => r.dataset.arm)"))
    assert arms == {"student", "teacher"}
    gates = page.eval_on_selector_all("#gates rect[data-gate]", "rects => rects.map(r => r.dataset.gate)")
    body = gateway.client.get("/v1/experiment").json()
    assert gates == [g["gate"] for g in body["this_replica"]["step"]["gates"]] and gates
    assert "no rollout" in page.locator("#steps").text_content()
    assert page.locator("#phase").inner_text().startswith("student vs teacher")
    versions = {m["name"]: m["version"] for m in gateway.client.get("/v1/models").json()["models"]}
    page.wait_for_selector('#versions .version[data-model="student_kd"]', timeout=10_000)
    assert (
        page.locator('#versions .version[data-model="student_kd"]')
        .inner_text()
        .startswith(f"student_kd v{versions['student_kd']}")
    )
    page.locator("#rollout").screenshot(path=str(ARTIFACTS / "experiment.png"))


def test_the_right_answer_given_on_the_page_is_joined_once_as_feedback(page, gateway):
    digits, labels = held_out(gateway)
    accepted = lambda: metric_value(  # noqa: E731
        gateway.client.get("/metrics").text, "kdserve_feedback_total", {"outcome": "accepted"}
    )
    duplicates = lambda: metric_value(  # noqa: E731
        gateway.client.get("/metrics").text, "kdserve_feedback_total", {"outcome": "duplicate"}
    )
    before, duplicates_before = accepted(), duplicates()
    draw(page, digits[0])
    wait_for_whole_drawing(page)
    page.wait_for_selector("#truth:not([hidden])")
    page.click(f'#truthbuttons button[data-label="{labels[0]}"]')
    page.wait_for_selector("#truthstatus[data-outcome]")
    assert page.locator("#truthstatus").get_attribute("data-outcome") == "accepted"
    assert page.locator("#truthstatus").inner_text().startswith(f"Thanks: {labels[0]}")
    assert accepted() == before + 1
    page.click(f'#truthbuttons button[data-label="{labels[0]}"]')  # the same request again: counted once
    page.wait_for_function("document.getElementById('truthstatus').dataset.outcome === 'duplicate_feedback'")
    assert "already counted" in page.locator("#truthstatus").inner_text()
    assert accepted() == before + 1 and duplicates() == duplicates_before + 1
