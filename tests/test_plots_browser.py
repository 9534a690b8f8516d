"""The pages of `dvc plots show` and `dvc plots diff`, opened in headless Chromium with
the network cut off: every plot declared in dvc.yaml is drawn, no script fails and the
page requests nothing beyond its own folder. dvc-render's default page (scripts from a
CDN), opened the same way, is the control: blank, with script errors and CDN requests.
PLOTS_SCREENSHOTS=<folder> also saves a screenshot of each page there, to look at."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import LOW_LR, TinyRepo, copy_repo, run_cmd
from dvc_render.base import Renderer
from dvc_render.html import PAGE_HTML

pytestmark = pytest.mark.slow

# Set in CI (.ci/run), where a missing browser is a failure, not a reason to skip.
REQUIRED = os.environ.get("PLOTS_BROWSER_REQUIRED") == "1"
OFFLINE = [
    "--headless",
    "--no-sandbox",  # as root in CI containers
    "--disable-gpu",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves
    "--proxy-server=127.0.0.1:9",  # and nothing that gets past that connects
    "--virtual-time-budget=15000",  # run the page's scripts and timers, then stop
]
# Put first in <head>: every script error, failed load, rejected promise and console
# warning or error becomes an element that --dump-dom shows.
HOOK = """<script>
(function () {
  function note(kind, text) {
    var pre = document.createElement("pre");
    pre.className = "browser-test-error";
    pre.textContent = kind + ": " + text;
    document.documentElement.appendChild(pre);
  }
  addEventListener("error", function (e) {
    note("error", e.message || (e.target && (e.target.src || e.target.outerHTML)));
  }, true);
  addEventListener("unhandledrejection", function (e) { note("rejection", e.reason); });
  ["error", "warn"].forEach(function (level) {
    var log = console[level];
    console[level] = function () {
      note("console." + level, Array.prototype.join.call(arguments, " "));
      log.apply(console, arguments);
    };
  });
})();
</script>"""
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    if REQUIRED:
        pytest.fail("Chromium is not installed (apt-get install chromium), and CI needs it")
    pytest.skip("Chromium is not installed: apt-get install chromium (.ci/run does)")


class Page(HTMLParser):
    """A dumped DOM: per plot div, its drawn SVG marks (mark group, aria-label), its axes,
    its x-axis tick labels and its images; and the errors the hook or the page wrote."""

    def __init__(self, dom: str, ids: set[str]) -> None:
        super().__init__()
        self.ids, self.stack = ids, []
        self.marks: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.axes: dict[str, list[str]] = defaultdict(list)
        self.x_ticks: dict[str, list[str]] = defaultdict(list)
        self.images: dict[str, list[str]] = defaultdict(list)
        self.errors: list[str] = []
        self.feed(dom)

    def up(self, test: Callable[[str, dict], bool]) -> dict | None:
        """The attributes of the innermost open element that passes `test`."""
        return next((a for tag, a in reversed(self.stack) if test(tag, a)), None)

    def plot(self) -> str | None:
        found = self.up(lambda _, a: a.get("id") in self.ids)
        return found and found["id"]

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs, plot = dict(attrs), self.plot()
        parent = self.stack[-1][1].get("class") or "" if self.stack else ""
        if plot and tag == "img":
            self.images[plot].append(attrs["src"])
        elif plot and tag == "g" and "role-axis " in (attrs.get("class") or "") + " ":
            self.axes[plot].append(attrs.get("aria-label", ""))
        elif plot and tag in ("path", "text") and "role-mark" in parent:
            self.marks[plot].append((parent, attrs.get("aria-label", "")))
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        classes = (self.stack[-1][1].get("class") or "").split() if self.stack else []
        if "browser-test-error" in classes or "plot-error" in classes:
            self.errors.append(data)
        axis = self.up(lambda _, a: "role-axis" in (a.get("class") or "").split())
        labels = self.up(lambda _, a: "role-axis-label" in (a.get("class") or ""))
        if axis and labels and axis.get("aria-label", "").startswith("X-axis"):
            self.x_ticks[self.plot()].append(data)


def requests_from_page(netlog: Path) -> list[str]:
    """URLs that the page (not the browser's own services) asked the network for."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start
        and "file://" in event["params"].get("network_isolation_key", "")
        and not event["params"]["url"].startswith(("file:", "data:", "blob:"))
    ]


def open_offline(page: Path, work: Path) -> tuple[str, list[str]]:
    """The DOM of `page` once its scripts ran offline, and the URLs it requested."""
    probe = page.with_name("probe.html")  # beside it: its static/ images resolve the same
    probe.write_text(page.read_text(encoding="utf-8").replace("<head>", "<head>" + HOOK, 1))
    work.mkdir()
    netlog = work / "netlog.json"
    browser = [chromium(), *OFFLINE, f"--user-data-dir={work / 'profile'}"]
    shown = subprocess.run(
        [*browser, f"--log-net-log={netlog}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert shown.returncode == 0 and "</html>" in shown.stdout, shown.stderr[-3000:]
    if folder := os.environ.get("PLOTS_SCREENSHOTS"):
        shot = Path(folder).resolve() / f"{page.parent.name}.png"
        size = "--window-size=1400,2400"
        subprocess.run([*browser, f"--screenshot={shot}", size, probe.as_uri()], timeout=180)
    return shown.stdout, requests_from_page(netlog)


def declared_ids(project: Path) -> tuple[list[str], list[str]]:
    """The page ids of the vega plots and of the images that dvc.yaml declares."""
    paths = yaml.safe_load((project / "params.yaml").read_text())["paths"]
    text = (project / "dvc.yaml").read_text()
    text = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], text)
    vega, images = [], []
    for plot in yaml.safe_load(text)["plots"]:
        if isinstance(plot, dict):
            vega.append(Renderer.remove_special_chars(next(iter(plot))))
        else:
            target = project / plot
            files = sorted(target.glob("*.png")) if target.is_dir() else [target]
            images += [Renderer.remove_special_chars(str(f.relative_to(project))) for f in files]
    return vega, images


LINES_PER_RUN = {"Loss_per_epoch": 2, "Accuracy_per_epoch": 2, "Learning_rate": 1}  # files


def check_page(page: Path, work: Path, vega: list[str], images: list[str], revs: list[str]) -> None:
    dom, requests = open_offline(page, work)
    assert requests == [], f"the page asked the network for {requests}"
    drawn = Page(dom, set(vega + images))
    assert drawn.errors == [], drawn.errors
    for plot in vega:
        assert drawn.marks[plot], f"{plot}: nothing drawn"
    for plot, files in LINES_PER_RUN.items():  # a line per run and file, in one chart
        lines = [label for group, label in drawn.marks[plot] if group.startswith("mark-line")]
        assert len(lines) == files * len(revs), (plot, lines)
        assert {re.search(r"rev: ([^;]+)", line).group(1) for line in lines} == set(revs)
        assert len([a for a in drawn.axes[plot] if a.startswith("X-axis")]) == 1, plot
        ticks = drawn.x_ticks[plot]  # whole epochs, each once
        assert ticks and all(t.isdigit() for t in ticks) and len(set(ticks)) == len(ticks), ticks
    # a full 10 x 10 grid per run, actual down, predicted across
    confusion = "Confusion_matrix__test_"
    cells = [label for group, label in drawn.marks[confusion] if "layer_0" in group]
    for rev in revs:
        assert len([cell for cell in cells if f"run: {rev};" in cell]) == 100, rev
    assert any(a.startswith("Y-axis titled 'actual'") for a in drawn.axes[confusion])
    assert any(a.startswith("X-axis titled 'predicted'") for a in drawn.axes[confusion])
    for image in images:  # one per run (a missing file would be an error above)
        assert len(drawn.images[image]) == len(revs), image


def test_plot_pages_render_offline(tiny_experiment: TinyRepo, tmp_path: Path) -> None:
    """`dvc plots show` of a run and `dvc plots diff` of it and an experiment, opened
    offline in headless Chromium: every declared plot drawn, nothing asked of the network."""
    chromium()  # skip (or fail in CI) before anything else
    project = copy_repo(tiny_experiment.path, tmp_path / "project")

    def dvc(*args: str) -> None:
        run_cmd([sys.executable, "-m", "dvc", *args], cwd=project)

    dvc("plots", "show", "-o", "show")
    dvc("plots", "diff", "HEAD", LOW_LR, "-o", "diff")
    vega, images = declared_ids(project)
    assert len(vega) == 4 and len(images) == 4
    check_page(project / "show/index.html", tmp_path / "show", vega, images, ["workspace"])
    check_page(project / "diff/index.html", tmp_path / "diff", vega, images, ["HEAD", LOW_LR])

    # the control: dvc-render's own page, from the same data, offline
    (tmp_path / "cdn.html").write_text(PAGE_HTML)
    dvc("plots", "show", "-o", "cdn", "--html-template", str(tmp_path / "cdn.html"))
    dom, requests = open_offline(project / "cdn/index.html", tmp_path / "cdn")
    assert any("cdn.jsdelivr.net/npm/vega@" in url for url in requests), requests
    drawn = Page(dom, set(vega))
    assert not drawn.marks and any("vegaEmbed is not defined" in e for e in drawn.errors)
