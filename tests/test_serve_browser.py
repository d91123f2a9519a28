"""perspicio serve in a real headless browser: Playwright driving the Debian chromium
(``/usr/bin/chromium`` via ``executable_path``; nothing is downloaded).

Desktop and phone width: load the page, pick a bundled sample, choose two methods, wait for both
overlays, check they are images of the model's input size, move the opacity slider, download the
JSON, score the methods. Screenshots go to ``$PERSPICIO_ARTIFACTS`` (default
``test-artifacts/serve``); the README's screenshot is ``docs/img/serve.png`` (refreshed by running
this file with ``PERSPICIO_README_SCREENSHOT=1``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
from conftest import BROWSER_SIZES as SIZES  # noqa: E402
from conftest import CHROMIUM, browser_module_setup  # noqa: E402

sync_api, ARTIFACTS = browser_module_setup("serve")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def wait_for(page, expression: str, timeout: float) -> None:
    """Poll ``expression`` with ``page.evaluate`` (the page's CSP forbids the string evaluation
    ``page.wait_for_function`` uses, and the test keeps the CSP on)."""
    end = time.monotonic() + timeout
    while not page.evaluate(f"() => Boolean({expression})"):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for: {expression}")
        page.wait_for_timeout(100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    from perspicio.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(workers=2, time_limit=600))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(600):
        if srv.started and app.state.pool is not None:
            break
        time.sleep(0.1)
    assert app.state.pool.wait_ready(300)
    yield f"http://127.0.0.1:{port}/"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def method_labels_overflowing(page) -> list[str]:
    """Method names in the picker that leave their family's box or break over more than one line
    (the registry's longest names, e.g. neuron_integrated_gradients, at desktop and phone width)."""
    return page.evaluate(
        """() => [...document.querySelectorAll('.family label')].filter((label) => {
          if (label.offsetParent === null) return false;  // in a hidden tab
          const name = label.querySelector('.mname');
          const n = name.getBoundingClientRect();
          const box = label.closest('fieldset').getBoundingClientRect();
          const lines = n.height / parseFloat(getComputedStyle(name).fontSize);
          return n.width === 0 || n.left < box.left || n.right > box.right || lines > 2;
        }).map((label) => label.textContent.trim())"""
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_page_explains_two_methods(server: str, browser, size: str, tmp_path: Path) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=SIZES[size], accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    offsite: list[str] = []
    page.on(
        "request",
        lambda r: None if r.url.startswith((server, "data:", "blob:")) else offsite.append(r.url),
    )
    page.goto(server)
    page.wait_for_selector(".topclass", timeout=120_000)
    assert method_labels_overflowing(page) == []
    page.click("label[for=sample-coffee]")
    wait_for(
        page,
        "document.querySelector('.topclass .name') && "
        "document.querySelector('.topclass .name').textContent === 'espresso'",
        120,
    )
    for box in page.query_selector_all("input[name=method]:checked"):
        box.uncheck()
    page.check("#m-gradcam")
    page.check("#m-input_x_gradient")
    page.click("#explain")
    wait_for(
        page,
        "document.querySelectorAll('.card img.heat').length === 2 && "
        "[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)",
        300,
    )
    sizes = page.eval_on_selector_all(
        ".card img.heat, .card img.photo", "els => els.map(e => [e.naturalWidth, e.naturalHeight])"
    )
    assert sizes == [[224, 224]] * 4
    assert page.eval_on_selector_all(".card img.heat", "els => els.map(e => e.dataset.method)") == [
        "gradcam",
        "input_x_gradient",
    ]
    # the shared slider sets every overlay's opacity
    page.fill("#opacity", "25")
    page.dispatch_event("#opacity", "input")
    assert page.eval_on_selector_all(".card img.heat", "els => els.map(e => e.style.opacity)") == [
        "0.25",
        "0.25",
    ]
    assert page.text_content("#opacity-value") == "25%"
    # keyboard: focus a map and read a value with the arrow keys
    page.focus(".stack")
    page.keyboard.press("ArrowRight")
    assert page.text_content(".readout").startswith("value at (")
    # overlay / raw switch
    page.check("input[name=view][value=raw]")
    assert page.eval_on_selector_all(".card img.photo", "els => els.every(e => e.hidden)")
    page.check("input[name=view][value=overlay]")
    assert "perspicio explain coffee" in page.input_value("#cli")
    with page.expect_download() as info:
        page.click("#download-json")
    path = tmp_path / "explain.json"
    info.value.save_as(path)
    data = json.loads(path.read_text())
    assert [m["method"] for m in data["methods"]] == ["gradcam", "input_x_gradient"]
    assert len(data["methods"][0]["values"]) == 224 and len(data["methods"][0]["values"][0]) == 224
    assert data["target"]["name"] == "espresso"
    if size == "desktop":  # the trust table once (the phone run checks the layout of the same page)
        page.click("#score")
        page.wait_for_selector("table.trust tbody tr", timeout=600_000)
        ranked = page.eval_on_selector_all(
            "table.trust tbody th", "els => els.map(e => e.textContent)"
        )
        assert sorted(ranked) == ["gradcam", "input_x_gradient"]
        assert (
            page.locator(".curve svg polyline").count() == 4
        )  # deletion and insertion, two methods each
        assert page.locator(".plain li").count() == 4
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= SIZES[size]["width"], f"horizontal scrolling at {size} width: {width}px"
    page.screenshot(path=str(ARTIFACTS / f"page-{size}.png"), full_page=True)
    if size == "desktop" and os.environ.get("PERSPICIO_README_SCREENSHOT"):
        from PIL import Image  # 256 colours: a third of the bytes, the same look

        Image.open(ARTIFACTS / f"page-{size}.png").convert("RGB").quantize(256).save(
            ROOT / "docs" / "img" / "serve.png", optimize=True
        )
    assert errors == [] and offsite == []
    context.close()


def test_upload_and_error_message(server: str, browser, tmp_path: Path) -> None:
    page = browser.new_page(viewport=SIZES["desktop"])
    page.goto(server)
    page.wait_for_selector(".topclass", timeout=120_000)
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    page.set_input_files("#file", str(text))
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "not a PNG or JPEG" in page.text_content("#error")
    from perspicio import zoo

    real = tmp_path / "rocket.jpg"
    zoo.sample("rocket").save(real, format="JPEG")
    page.set_input_files("#file", str(real))
    wait_for(
        page,
        "document.querySelector('#error').hidden && document.querySelectorAll('.topclass').length === 5",
        120,
    )
    page.close()


@pytest.mark.parametrize(
    ("size", "model"), [("desktop", "breast_cancer_xgb"), ("phone", "breast_cancer_mlp")]
)
def test_tabular_tab(server: str, browser, size: str, model: str, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from perspicio.serve.tabular import available_models

    if model not in available_models():
        pytest.skip(f"{model} needs a package that is not installed")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=SIZES[size], accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    page.wait_for_selector("#tab-btn-tabular:not([hidden])", timeout=300_000)
    page.focus("#tab-btn-images")
    page.keyboard.press("ArrowRight")  # the tabs work with the keyboard
    assert page.get_attribute("#tab-btn-tabular", "aria-selected") == "true"
    assert page.is_hidden("#tab-images") and page.is_visible("#tab-tabular")
    page.select_option("#tab-model", model)
    wait_for(  # the rows of the chosen model (the default model's may arrive first)
        page,
        f"document.querySelector('#tab-row').dataset.model === '{model}' && "
        "document.querySelectorAll('#tab-row option').length === 114",
        300,
    )
    page.select_option("#tab-row", "7")
    page.click("#tab-explain")
    wait_for(
        page,
        "document.querySelectorAll('#tab-out img[data-plot]').length === 3 && "
        "[...document.querySelectorAll('#tab-out img')].every(i => i.complete && i.naturalWidth > 0)",
        600,
    )
    plots = page.eval_on_selector_all("#tab-out img", "els => els.map(e => e.dataset.plot)")
    assert plots == ["force", "waterfall", "beeswarm"]
    assert page.locator(".featuretable tbody tr").count() == 8
    assert f"--model {model}" in page.input_value("#tab-cli")
    with page.expect_download() as info:
        page.click("#tab-out button:text('Download JSON')")
    path = tmp_path / "row.json"
    info.value.save_as(path)
    data = json.loads(path.read_text())
    assert (
        data["model"] == model
        and data["row"] == 7
        and len(data["features"]) == 30
        and "images" not in data
    )
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= SIZES[size]["width"], f"horizontal scrolling at {size} width: {width}px"
    page.screenshot(path=str(ARTIFACTS / f"tabular-{size}.png"), full_page=True)
    assert errors == []
    context.close()


@pytest.mark.parametrize("size", list(SIZES))
def test_text_tab(server: str, browser, size: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from perspicio.serve.text import available_models

    if not available_models():
        pytest.skip("the bundled text model needs the 'text' extra")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport=SIZES[size], accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server)
    page.wait_for_selector("#tab-btn-text:not([hidden])", timeout=120_000)
    page.click("#tab-btn-text")
    page.wait_for_selector("#tm-integrated_gradients", timeout=60_000)
    assert page.is_hidden("#tab-images") and page.is_visible("#tab-text")
    assert method_labels_overflowing(page) == []
    page.fill("#text-input", "a wonderful little film")
    for box in page.query_selector_all("input[name=text-method]:checked"):
        box.uncheck()
    page.check("#tm-attention_rollout")
    page.check("#tm-integrated_gradients")
    page.fill("#text-target", "a great movie")
    page.click("#text-explain")
    page.wait_for_selector("#text-out .tokens", timeout=600_000)
    strips = page.eval_on_selector_all(
        "#text-out .tokens",
        "els => els.map(e => [e.dataset.method, [...e.children].map(c => c.textContent), "
        "[...e.children].map(c => c.style.backgroundColor)])",
    )
    assert [s[0] for s in strips] == ["integrated_gradients", "attention_rollout"]  # page order
    for _, tokens, colors in strips:
        assert tokens == ["[CLS]", "a", "wonderful", "little", "film", "[SEP]"]
        assert all(c.startswith("rgb") for c in colors)  # coloured through the CSSOM (CSP-safe)
    page.focus("#text-out .tokens >> nth=1")
    page.keyboard.press("ArrowRight")
    assert page.text_content("#text-out .readout >> nth=1").startswith("token 1 'a': ")
    wait_for(  # the attention matrices and the lines view in its sandboxed frame
        page,
        "document.querySelectorAll('#text-out img[data-plot]').length === 2 && "
        "[...document.querySelectorAll('#text-out img')].every(i => i.complete && i.naturalWidth > 0)",
        120,
    )
    frame = page.frame_locator("#text-lines")
    frame.locator("svg line").first.wait_for(state="attached", timeout=120_000)
    assert frame.locator("svg text.q").count() == 6  # one query label per token
    assert "--model minilm" in page.input_value("#text-cli")
    with page.expect_download() as info:
        page.click("#text-download-json")
    path = tmp_path / "text.json"
    info.value.save_as(path)
    data = json.loads(path.read_text())
    assert [m["method"] for m in data["methods"]] == ["integrated_gradients", "attention_rollout"]
    assert data["methods"][0]["tokens"][2] == "wonderful" and "png" not in data["methods"][0]
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= SIZES[size]["width"], f"horizontal scrolling at {size} width: {width}px"
    page.screenshot(path=str(ARTIFACTS / f"text-{size}.png"), full_page=True)
    if size == "desktop":  # bad input: the one-line error; a long text: the truncation warning
        page.fill("#text-input", "   ")
        page.click("#text-explain")
        page.wait_for_selector("#error:not([hidden])", timeout=60_000)
        assert "the text is empty" in page.text_content("#error")
        page.fill("#text-input", "word " * 300)
        page.uncheck("#tm-integrated_gradients")
        page.click("#text-explain")
        page.wait_for_selector("#text-warning:not([hidden])", timeout=300_000)
        assert "46 token(s) were dropped" in page.text_content("#text-warning")
        assert page.is_hidden("#error")
    assert errors == []
    context.close()
