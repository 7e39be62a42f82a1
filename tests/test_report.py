"""The report: its order (the answer, figures, Grad-CAM, methods, collapsed tables), its generated
methods paragraph, and report.html in a real headless browser (Debian's chromium), on screen and
printed to PDF.

The browser check loads the report from a file:// URL with networking off. Every <img> must
really decode (drawn into a canvas it has more than one colour), not merely parse a header: a PNG
truncated to 64 bytes still reports its width. Nothing
may reach the console. A missing chromium skips these tests, except under CI (CI=true), where it
is a failure.
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

import numpy as np
import pytest
from PIL import Image

from analysis import report
from analysis.records import load_sweep

try:  # tests/ as a plain folder (pytest's default rootdir import) or as a package
    from test_report_effects import FINE, fabricate
except ImportError:
    from tests.test_report_effects import FINE, fabricate

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]

# Appended to a COPY of the report: after the load event, draw every image into a canvas and
# write what the page saw into the DOM. Drawing is the test that the pixels decoded: Chromium
# reports a PNG cut after its header as complete, with its width, and even resolves img.decode()
# for it, but draws nothing (one transparent colour).
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = [];
  for (const img of imgs) {
    try {
      if (!img.complete || img.naturalWidth === 0) throw new Error('not loaded');
      const c = document.createElement('canvas');
      c.width = Math.min(img.naturalWidth, 400);
      c.height = Math.max(1, Math.round(img.naturalHeight * c.width / img.naturalWidth));
      const ctx = c.getContext('2d');
      ctx.drawImage(img, 0, 0, c.width, c.height);
      const px = ctx.getImageData(0, 0, c.width, c.height).data;
      const colours = new Set();
      for (let i = 0; i < px.length && colours.size < 3; i += 4 * 7)
        colours.add(px[i] + ',' + px[i + 1] + ',' + px[i + 2] + ',' + px[i + 3]);
      if (colours.size < 2) broken.push(img.alt);
    } catch (e) { broken.push(img.alt); }
  }
  const banner = document.getElementById('phantom-banner');
  const details = [...document.querySelectorAll('details')];
  const out = {images: imgs.length, broken: broken, widths: imgs.map(i => i.naturalWidth),
               tables: document.querySelectorAll('table').length,
               tablesInDetails: document.querySelectorAll('details table').length,
               details: details.length, detailsOpen: details.filter(d => d.open).length,
               title: document.title, h1: (document.querySelector('h1') || {}).textContent,
               sections: [...document.querySelectorAll('h2')].map(h => h.id),
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


def run_chromium(args: list[str], tmp_path, tag: str) -> tuple[str, str]:
    """(stdout, browser log) of one headless chromium run we start and, if need be, kill."""
    exe = chromium_or_skip()
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / ('profile-' + tag)}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the browser we started, and only its children
        proc.communicate()
        pytest.fail(f"chromium did not finish in 180 s: {args}")
    assert proc.returncode == 0, err[-2000:]
    return out, err


def console_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def browser_check(report_path: str, tmp_path, tag: str) -> dict:
    text = open(report_path, encoding="utf-8").read()
    probe = tmp_path / f"probe-{tag}.html"
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    dom, log = run_chromium(["--virtual-time-budget=10000", "--dump-dom", "file://" + str(probe)],
                            tmp_path, tag)
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


def _smallcnn_state(resolution: int):
    from trainer.models import create_model
    return create_model("smallcnn", resolution, outputs=5, weights="none").state_dict()


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """Two families, two sizes of one, EfficientNet; smallcnn planted best (its checkpoints are
    small), so every figure and the Grad-CAM panels appear."""
    root = tmp_path_factory.mktemp("report")
    states = {}

    def checkpoint(p, key):
        if p["model"] != "smallcnn":
            return None
        if p["resolution"] not in states:
            states[p["resolution"]] = _smallcnn_state(p["resolution"])
        return states[p["resolution"]]

    fab = fabricate(root, resolutions=(64, 128), models=("smallcnn", "resnet18", "resnet34", "efficientnet"),
                    boost={"smallcnn": 3.0}, checkpoint=checkpoint,
                    finished=lambda p: not (p["model"] == "resnet18" and p["resolution"] == 128
                                            and p["seed"] == 1))
    img = np.zeros((96, 96), np.uint8)
    img[20:60, 30:70] = 200
    img_path = root / "probe.png"
    Image.fromarray(img).save(img_path)
    data = load_sweep(fab.location)
    out = str(root / "out")
    files, skipped = report.write_report(data, {}, out, gradcam_images=[str(img_path)])
    return fab, out, files, skipped


def _read(out, name):
    return open(os.path.join(out, name), encoding="utf-8").read()


def test_every_figure_and_gradcam_is_drawn(full_report):
    _, out, files, skipped = full_report
    stems = ["answer_heatmap", "auroc_vs_resolution_per_model", "models_per_resolution",
             "best_configurations", "model_scaling", "efficientnet", "gradcam"]
    assert skipped == []
    md = _read(out, "report.md")
    for stem in stems:
        assert f"figures/{stem}.png" in files
        assert f"(figures/{stem}.png)" in md
        with Image.open(os.path.join(out, "figures", f"{stem}.png")) as im:
            im.load()   # decodes the whole image, not only its header
            assert im.size[0] > 300


def test_report_reads_top_down(full_report):
    """The answer, figures, Grad-CAM, methods, then tables, and every table there collapsed."""
    _, out, _, _ = full_report
    text = _read(out, "report.html")
    order = [text.index(f"<h2 id='{s}'>") for s in ("answer", "figures", "gradcam", "methods", "tables")]
    assert order == sorted(order)
    head, tail = text.split("<h2 id='tables'>")
    assert head.count("<table") == 1                          # the answer's own table
    blocks = re.findall(r"<details>.*?</details>", tail, re.S)
    assert tail.count("<table") == sum(b.count("<table") for b in blocks) > 5
    md = _read(out, "report.md")
    assert md.index("## The answer") < md.index("## Figures") < md.index("## Grad-CAM") \
        < md.index("## Methods") < md.index("## Tables")
    assert "<details><summary>Training configuration shared by every trial</summary>" in md


def test_the_answer_names_the_planted_best_with_its_effect(full_report):
    _, out, _, _ = full_report
    md = _read(out, "report.md")
    line = next(x for x in md.splitlines() if x.startswith(f"- **{FINE}**"))
    assert "best **smallcnn at 128 px**" in line
    assert "over smallcnn at 64 px (paired DeLong p = " in line and "80 studies" not in line
    delta = float(re.search(r"; ([+-]\d\.\d{3}) \[", line).group(1))
    ans = report.effects.answer(load_sweep(full_report[0].location).trials,
                                load_sweep(full_report[0].location).predictions,
                                report.families.same_model).set_index("task").loc[FINE]
    assert delta == round(ans["delta"], 3) and delta > 0


def test_methods_say_what_ran(full_report, tmp_path):
    _, out, _, _ = full_report
    md = _read(out, "report.md")
    methods = md.split("## Methods")[1].split("## Tables")[0]
    assert "synthetic phantom" in methods
    assert "118 images stored (98 train and 20 valid)" in methods and "2 rows rejected" in methods
    assert "one multi-task model with 5 outputs" in methods and "one binary model per task" in methods
    assert "efficientnet-b0, efficientnet-b1, resnet18, resnet34 and smallcnn" in methods
    assert "64 px and 128 px" in methods and "random weights" in methods
    assert "git commit " + "0123abcd" * 5 in methods and "torch 2.9.0" in methods
    assert "`python -m orchestrator.sweep --name fab`" in methods
    single = fabricate(tmp_path, resolutions=(64,), models=("resnet18",), task_mode="single")
    data = load_sweep(single.location)
    parts = report.compute_parts(data, {}, figures=False, gradcam=False)
    text = " ".join(parts.methods)
    assert "one single-task binary model for one task, as the thesis did" in text
    assert "multi-task" not in text


def test_configuration_is_a_table_not_json(full_report):
    _, out, _, _ = full_report
    text = _read(out, "report.html")
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "{&quot;" not in without_images and '{"' not in without_images
    assert "<td class='t'>lr_head</td><td class='t'>0.01</td>" in text


def test_html_report_is_self_contained(full_report):
    _, out, _, _ = full_report
    text = _read(out, "report.html")
    parser = _Resources()
    parser.feed(text)
    assert "script" not in parser.tags and "link" not in parser.tags and "iframe" not in parser.tags
    imgs = [v for tag, k, v in parser.urls if tag == "img"]
    assert len(imgs) == 7
    for tag, k, v in parser.urls:
        assert v.startswith("data:image/png;base64,"), (tag, k, v[:80])
    embedded = {base64.b64decode(uri.split(",", 1)[1]) for uri in imgs}
    on_disk = {open(os.path.join(out, "figures", f), "rb").read()
               for f in os.listdir(os.path.join(out, "figures"))}
    assert embedded == on_disk
    assert "url(" not in text and "@import" not in text
    assert "id='phantom-banner'" in text


def test_html_report_renders_in_chromium(full_report, tmp_path):
    _, out, _, _ = full_report
    result = browser_check(os.path.join(out, "report.html"), tmp_path, "full")
    assert result["images"] == 7 and result["broken"] == [], result
    assert all(w > 300 for w in result["widths"]), result
    assert result["banner"] is True
    assert result["sections"] == ["answer", "figures", "gradcam", "methods", "tables"]
    assert result["details"] >= 6 and result["detailsOpen"] == 0
    assert result["tables"] - result["tablesInDetails"] == 1
    assert result["console"] == []
    # The unmodified report (no probe script) logs nothing either.
    _, log = run_chromium(["--dump-dom", "file://" + os.path.join(out, "report.html")], tmp_path, "plain")
    assert console_lines(log) == []


def _truncate_images(text: str, keep: int = 64) -> str:
    def cut(m):
        png = base64.b64decode(m.group(1))[:keep]
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return re.sub(r"data:image/png;base64,([A-Za-z0-9+/=]+)", cut, text)


def test_browser_check_catches_truncated_images(full_report, tmp_path):
    """A PNG cut to 64 bytes keeps its header (width and height): the check must still fail."""
    _, out, _, _ = full_report
    bad = tmp_path / "truncated.html"
    bad.write_text(_truncate_images(_read(out, "report.html")), encoding="utf-8")
    result = browser_check(str(bad), tmp_path, "truncated")
    assert result["images"] == 7 and len(result["broken"]) == 7, result


def test_browser_check_catches_a_broken_image_and_console_output(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><title>t</title></head><body><h1>x</h1>"
                    "<img alt='broken' src='data:image/png;base64,AAAA'>"
                    "<img alt='remote' src='http://example.invalid/a.png'>"
                    "<script>console.error('boom')</script></body></html>")
    result = browser_check(str(page), tmp_path, "bad")
    assert result["broken"] == ["broken", "remote"]
    assert any("boom" in line for line in result["console"])


def test_report_prints_to_pdf(full_report, tmp_path):
    """``chromium --headless --print-to-pdf``: a real PDF of several pages, the collapsed tables
    printed open (the same report with its tables left collapsed in print has fewer pages)."""
    _, out, _, _ = full_report
    pdf = tmp_path / "report.pdf"
    run_chromium(["--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                  "file://" + os.path.join(out, "report.html")], tmp_path, "pdf")
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-1024:]
    pages = len(re.findall(rb"/Type\s*/Page\b", data))
    assert len(data) > 300_000 and pages >= 5
    text = _read(out, "report.html")
    rule = re.search(r"details::details-content\{[^}]*\}", text)
    assert rule, "the print rule that opens collapsed tables is gone"
    plain = tmp_path / "collapsed.html"
    plain.write_text(text.replace(rule.group(0), ""), encoding="utf-8")
    pdf2 = tmp_path / "plain.pdf"
    run_chromium(["--no-pdf-header-footer", f"--print-to-pdf={pdf2}", "file://" + str(plain)],
                 tmp_path, "pdf2")
    assert pages > len(re.findall(rb"/Type\s*/Page\b", pdf2.read_bytes()))


def test_partial_real_data_report(tmp_path):
    """No banner on real data; one model: the scaling and EfficientNet figures are skipped and
    the report says why; a missing trial makes the report say it is partial."""
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("resnet18",), phantom=False,
                    finished=lambda p: p["resolution"] == 64 or p["seed"] != 0 or True)
    fab2 = fabricate(tmp_path / "b", resolutions=(64, 128), models=("resnet18",), phantom=False,
                     finished=lambda p: p["resolution"] == 64)
    for f, partial in ((fab, False), (fab2, True)):
        data = load_sweep(f.location)
        out = str(tmp_path / ("out-partial" if partial else "out"))
        files, skipped = report.write_report(data, {}, out, gradcam=False)
        md, text = _read(out, "report.md"), _read(out, "report.html")
        assert "SYNTHETIC" not in md and "phantom-banner" not in text
        assert sorted(s.split(":")[0] for s in skipped) == ["efficientnet.png", "model_scaling.png"]
        assert "two sizes of one family" in md
        assert ("This report is partial" in md) is partial
        assert ("Every trial of the grid finished" in text) is not partial
        if partial:
            assert "best **resnet18 at 64 px**" in md and "lowest resolution of the sweep" in md


def test_default_gradcam_images_are_the_first_frontal_validation_images(tmp_path):
    """Without --images the Grad-CAM rows are the store's first frontal validation images
    (image-id order), at its largest resolution, pixel for pixel."""
    from analysis.report_gradcam import store_images
    from preprocessing.__main__ import build_parser
    from preprocessing.store import open_store

    def run(*argv):   # the real entry points, in this process (no interpreter start-up)
        args = build_parser().parse_args(list(argv))
        assert args._run(args) == 0

    run("phantom", "--out", str(tmp_path / "ph"), "--studies", "12", "--min-size", "300",
        "--max-size", "340", "--seed", "3")
    run("build", "--image-root", str(tmp_path / "ph"), "--csv", str(tmp_path / "ph" / "train.csv"),
        "--csv", str(tmp_path / "ph" / "valid.csv"), "--out", str(tmp_path / "store"),
        "--resolutions", "48,64", "--no-ray")
    store = open_store(str(tmp_path / "store"))
    valid = store.read(64, "valid", columns=["image_id", "view", "image"]).to_pandas()
    frontal = valid[valid["view"] == "Frontal"].sort_values("image_id")
    assert len(frontal) >= 2
    images = store_images(str(tmp_path / "store"), n=2)
    assert [im.name for im in images] == frontal["image_id"].head(2).tolist()
    for im, blob in zip(images, frontal["image"].head(2)):
        assert im.size == (64, 64)
        with Image.open(io.BytesIO(im.data)) as decoded:
            assert np.array_equal(np.asarray(decoded), np.asarray(store.decode(blob)))


def test_trials_of_another_configuration_are_named_not_pooled(tmp_path):
    from common.sweep_folder import SweepFolder
    fab = fabricate(tmp_path, resolutions=(64, 128), models=("resnet18",))
    changed = fab.trial_ids[-1]
    tf = SweepFolder(fab.location).trial(changed)
    doc = tf.read_config()
    doc["config"]["lr_head"] = 0.02        # another hyperparameter: another configuration
    tf.write_config(doc)
    data = load_sweep(fab.location)
    assert changed not in set(data.trials["trial_id"])
    out = str(tmp_path / "out")
    report.write_report(data, {"other_configurations": data.other_configurations()}, out,
                        figures=False)
    md, text = _read(out, "report.md"), _read(out, "report.html")
    assert "**1 trial(s) of another configuration are left out**" in md
    assert "<strong>1 trial(s) of another configuration are left out</strong>" in text
    assert changed in md.split("## Tables")[1]
    assert "best **resnet18 at 64 px**" in md      # the 128 px trial is not in the answer


def test_a_missing_gradcam_image_is_one_clear_error(tmp_path):
    fab = fabricate(tmp_path, resolutions=(64,), models=("resnet18",))
    proc = subprocess.run([os.sys.executable, "-m", "analysis.aggregate", "--sweep", fab.location,
                           "--results-dir", str(tmp_path / "out"), "--quiet",
                           "--gradcam-images", str(tmp_path / "nope.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        f"--gradcam-images: {tmp_path / 'nope.png'} does not exist")
    assert "Traceback" not in proc.stderr
