"""report.md / report.html content, and report.html in a real headless browser (Debian's chromium).

The browser check loads the report from a file:// URL with networking off: it must render, every
<img> must decode (naturalWidth > 0) and nothing may reach the console. A missing chromium skips
these tests, except under CI (CI=true), where it is a failure.
"""
from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re
import shutil
import signal
import subprocess

import pytest
from PIL import Image

from analysis import aggregate as agg
try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_aggregate import fabricate_sweep
except ImportError:
    from tests.test_aggregate import fabricate_sweep

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]

# Appended to a COPY of the report: after the load event, write what the page saw into the DOM.
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const banner = document.getElementById('phantom-banner');
  const out = {images: imgs.length,
               broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt),
               widths: imgs.map(i => i.naturalWidth),
               tables: document.querySelectorAll('table').length,
               title: document.title, h1: (document.querySelector('h1') || {}).textContent,
               banner: banner ? banner.offsetHeight > 0 : null,
               bodyHeight: document.body.scrollHeight};
  const pre = document.createElement('pre');
  pre.id = 'cxr-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium_or_skip() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("chromium is not installed, and CI=true: the HTML report cannot be checked")
    pytest.skip("chromium is not installed (apt-get install chromium); set CI=true to make this fail")


def run_chromium(path: str, tmp_path, tag: str) -> tuple[str, str]:
    """(DOM after load, browser log) of a local HTML file."""
    exe = chromium_or_skip()
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + tag)}", "--dump-dom",
           "file://" + os.path.abspath(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the browser we started, and only its children
        proc.communicate()
        pytest.fail(f"chromium did not finish loading {path} in 180 s")
    assert proc.returncode == 0, err[-2000:]
    return out, err


def console_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def browser_check(report_path: str, tmp_path, tag: str) -> dict:
    text = open(report_path, encoding="utf-8").read()
    probe = tmp_path / f"probe-{tag}.html"
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom, log = run_chromium(str(probe), tmp_path, tag)
    m = re.search(r'<pre id="cxr-check">(.*?)</pre>', dom, re.S)
    assert m, f"the page did not finish loading (no check result in the DOM):\n{dom[-1000:]}"
    result = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&")
                        .replace("&lt;", "<").replace("&gt;", ">"))
    result["console"] = console_lines(log)
    return result


class _Resources(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            if k in ("src", "href", "srcset", "data", "poster", "action") and v is not None:
                self.urls.append((tag, k, v))


@pytest.fixture(scope="module")
def phantom_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    fake = fabricate_sweep(root, resolutions=(160, 320), models=("resnet50", "resnet152", "efficientnet"),
                           seeds=(0,), finished=lambda t: not (t.params.model == "resnet152"
                                                              and t.params.resolution == 320))
    out = str(root / "out")
    summary = agg.aggregate(fake.location, out_dir=out)
    return fake, summary, out


def test_markdown_report_says_what_a_reader_needs(phantom_report):
    fake, summary, out = phantom_report
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "SYNTHETIC DATA" in md and "phantom" in md
    assert "Holm" in md and "DeLong" in md and "Sun & Xu" in md
    assert "resolutions**: 160, 320" in md and "efficientnet-b0, efficientnet-b3" in md
    assert "5 finished, 0 failed, 0 running, 1 pending, 0 missing" in md
    missing = next(t.trial_id for t in fake.trials
                   if t.params.model == "resnet152" and t.params.resolution == 320)
    assert "This report is partial" in md and missing in md
    for fname in ("auroc_vs_resolution.png", "model_scaling.png", "efficientnet.png"):
        assert f"(figures/{fname})" in md
        assert os.path.exists(os.path.join(out, "figures", fname))
    assert "**dataset**: phantom" in md and "phantom settings" in md


def test_html_report_is_self_contained(phantom_report):
    _, summary, out = phantom_report
    text = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    parser = _Resources()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    imgs = [v for tag, k, v in parser.urls if tag == "img"]
    assert len(imgs) == 3
    for tag, k, v in parser.urls:
        assert v.startswith("data:image/png;base64,"), (tag, k, v[:80])
    embedded = {base64.b64decode(uri.split(",", 1)[1]) for uri in imgs}
    on_disk = {open(os.path.join(out, "figures", f), "rb").read()
               for f in os.listdir(os.path.join(out, "figures"))}
    assert embedded == on_disk
    for png in embedded:
        assert Image.open(io.BytesIO(png)).format == "PNG"
    assert "url(" not in text and "@import" not in text
    assert "id='phantom-banner'" in text


def test_html_report_renders_in_chromium(phantom_report, tmp_path):
    _, summary, out = phantom_report
    result = browser_check(os.path.join(out, "report.html"), tmp_path, "phantom")
    assert result["images"] == 3 and result["broken"] == [], result
    assert all(w > 300 for w in result["widths"]), result
    assert result["banner"] is True
    assert result["tables"] >= 8 and result["h1"].startswith("Sweep report: fake")
    assert result["bodyHeight"] > 1000
    assert result["console"] == []
    # The unmodified report (no probe script) logs nothing either.
    _, log = run_chromium(os.path.join(out, "report.html"), tmp_path, "plain")
    assert console_lines(log) == []


def test_browser_check_catches_a_broken_image_and_console_output(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><h1>x</h1>"
                    "<img alt='broken' src='data:image/png;base64,AAAA'>"
                    "<img alt='remote' src='http://example.invalid/a.png'>"
                    "<script>console.error('boom')</script></body></html>")
    result = browser_check(str(page), tmp_path, "bad")
    assert result["broken"] == ["broken", "remote"]
    assert any("boom" in line for line in result["console"])


def test_report_of_real_data_has_no_banner_and_skips_missing_families(tmp_path):
    fake = fabricate_sweep(tmp_path, resolutions=(160,), models=("densenet121",), seeds=(0,),
                           phantom=False)
    summary = agg.aggregate(fake.location, out_dir=str(tmp_path / "out"))
    md = (tmp_path / "out" / "report.md").read_text()
    html_text = (tmp_path / "out" / "report.html").read_text()
    assert "SYNTHETIC" not in md and "phantom-banner" not in html_text
    assert "**dataset**: chexpert" in md
    assert "Every trial of the grid finished" in html_text
    assert sorted(s.split(":")[0] for s in summary.figures_skipped) == ["efficientnet.png",
                                                                        "model_scaling.png"]
    assert "Figures skipped" in md and "needs both models of a pair" in md
