"""The compare report (viz/report.py) in a real headless browser: Playwright driving the Debian
chromium (``/usr/bin/chromium`` via ``executable_path``; nothing is downloaded), at desktop (1280)
and phone (390) width. Checked programmatically: no label, legend or caption is cut (its
scrollWidth fits its box), nothing sticks out of the viewport at phone width (except inside the
table's own scroll box), SVG text stays inside its svg's viewBox and every curve inside its axes,
and the completeness tooltips agree with the cells. Screenshots go to ``$PERSPICIO_ARTIFACTS``
(default ``test-artifacts/report``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BROWSER_SIZES as SIZES  # noqa: E402
from conftest import CHROMIUM, browser_module_setup  # noqa: E402
from torch import nn

sync_api, ARTIFACTS = browser_module_setup("report")

pytestmark = pytest.mark.slow


class Net(nn.Module):
    """A small seeded CNN with a few layer groups (for cascading randomization)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier_with_a_long_name = nn.Linear(8, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier_with_a_long_name(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    from perspicio.metrics import compare
    from perspicio.viz.report import write_report

    model = Net().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 24, generator=g)  # non-square inputs
    comp = compare(
        model,
        x,
        methods=["gradcam", "saliency", "integrated_gradients", "lrp"],
        metrics=["deletion", "insertion", "completeness", "randomization"],
        metric_options={
            "deletion": {"steps": 12},
            "insertion": {"steps": 12},
            "randomization": {"steps": 3},
        },
    )
    photos = [
        Image.fromarray((np.asarray(x[i].permute(1, 2, 0)) * 255).astype("uint8")) for i in range(2)
    ]
    path, _ = write_report(
        comp,
        tmp_path_factory.mktemp("report") / "r.html",
        photos,
        sources=["first-photo-with-a-long-file-name.png", "second.png"],
    )
    return path


CHECK = """() => {
  const problems = [];
  const vw = document.documentElement.clientWidth;
  const inScroll = (el) => {
    for (let p = el.parentElement; p; p = p.parentElement) {
      const s = getComputedStyle(p);
      if (s.overflowX === 'auto' || s.overflowX === 'scroll') return true;
    }
    return false;
  };
  const what = (el) => el.tagName + ' "' + (el.textContent || '').trim().slice(0, 40) + '"';
  for (const el of document.querySelectorAll('td, th, figcaption, .label, h1, h2, p, code')) {
    if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX === 'visible')
      problems.push('cut: ' + what(el) + ' ' + el.scrollWidth + ' > ' + el.clientWidth);
  }
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('svg') && el.tagName !== 'svg') continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0) continue;
    if ((r.right > vw + 1 || r.left < -1) && !inScroll(el))
      problems.push('outside the viewport: ' + what(el) + ' ' + Math.round(r.left) + '..' + Math.round(r.right) + ' of ' + vw);
  }
  if (document.documentElement.scrollWidth > vw + 1)
    problems.push('page scrolls sideways: ' + document.documentElement.scrollWidth + ' > ' + vw);
  let texts = 0, curves = 0;
  for (const svg of document.querySelectorAll('svg')) {
    const given = svg.viewBox.baseVal;
    const vb = given && given.width > 0 ? given
      : {x: 0, y: 0, width: svg.width.baseVal.value, height: svg.height.baseVal.value};
    for (const t of svg.querySelectorAll('text')) {
      texts++;
      const b = t.getBBox();
      const m = t.getCTM();  // rotated labels: transform the box's corners
      const pts = [[b.x, b.y], [b.x + b.width, b.y], [b.x, b.y + b.height], [b.x + b.width, b.y + b.height]]
        .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
      const ctm0 = svg.getCTM();
      const inv = ctm0.inverse();
      for (const [X, Y] of pts) {
        const x = inv.a * X + inv.c * Y + inv.e, y = inv.b * X + inv.d * Y + inv.f;
        if (x < vb.x - 0.5 || x > vb.x + vb.width + 0.5 || y < vb.y - 0.5 || y > vb.y + vb.height + 0.5) {
          problems.push('svg text outside its viewBox: "' + t.textContent.slice(0, 40) + '"');
          break;
        }
      }
    }
    const frame = svg.querySelector('rect[stroke]');
    for (const line of svg.querySelectorAll('polyline')) {
      curves++;
      const clip = line.getAttribute('clip-path');
      const f = frame.getBBox();
      const clipped = clip && svg.querySelector(clip.slice(4, -1).replace('url(', ''));
      const b = line.getBBox();
      const inside = b.x >= f.x - 0.5 && b.x + b.width <= f.x + f.width + 0.5 && b.y >= f.y - 0.5 && b.y + b.height <= f.y + f.height + 0.5;
      if (!inside && !clipped) problems.push('curve leaves its axes in "' + svg.getAttribute('aria-label') + '"');
    }
  }
  const figs = [...document.querySelectorAll('.row figcaption')];
  for (let i = 0; i < figs.length; i++) for (let j = i + 1; j < figs.length; j++) {
    const a = figs[i].getBoundingClientRect(), b = figs[j].getBoundingClientRect();
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom)
      problems.push('captions overlap: ' + what(figs[i]) + ' / ' + what(figs[j]));
  }
  return {problems, texts, curves, figs: figs.length};
}"""


def test_report_fits_desktop_and_phone(report) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for name, size in SIZES.items():
                page = browser.new_page(viewport=size)
                page.goto(report.as_uri())
                page.screenshot(path=str(ARTIFACTS / f"report_{name}.png"), full_page=True)
                found = page.evaluate(CHECK)
                assert found["texts"] > 20 and found["curves"] >= 8 and found["figs"] >= 8, found
                assert found["problems"] == [], (name, found["problems"][:10])
                # the curves' data stays inside the plotted range (no clipping needed)
                tips = page.evaluate(
                    "() => [...document.querySelectorAll('td.na')].map(td => [td.parentElement.cells[0].textContent, td.title])"
                )
                for method, tip in tips:
                    assert f"not defined for {method}" in tip or "not defined" not in tip, (
                        method,
                        tip,
                    )
                    assert method != "lrp", tip  # LRP conserves its output relevance: never n/a
                page.close()
        finally:
            browser.close()


def test_chart_range_holds_every_point_and_legend_text_fits() -> None:
    import re

    from perspicio.viz.report import CHAR_PX, line_chart

    svg = line_chart(
        {"integrated_gradients (0.0123)": ([0, 1, 2], [0.5, -0.9, 0.2]), "b": ([0, 2], [1, 1])},
        title="t",
        xlabel="x",
        ylabel="y",
        ylim=(-0.2, 1.0),
    )
    width = float(re.search(r'viewBox="0 0 ([\d.]+) ', svg).group(1))
    assert width >= 22 + 48 + CHAR_PX * len("integrated_gradients (0.0123)")
    ticks = [float(v) for v in re.findall(r'text-anchor="end">([-\d.e]+)<', svg)]
    assert min(ticks) <= -0.9 and max(ticks) >= 1.0  # the range was widened to the data
    assert "clip-path" in svg
