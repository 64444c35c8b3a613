"""The documentation site builds strictly, loads nothing from other hosts, and renders in a browser.

The browser checks open built pages in headless Chromium (``--dump-dom`` after a virtual-time
budget) and assert that KaTeX typeset the math (KaTeX elements present, no KaTeX error, no raw
``\\(``, ``\\[`` or ``$$`` left in the visible text) and that every figure loaded (a script added
to our temporary copy of the page records each image's natural width once the page has loaded).
They skip when no Chromium is installed (Debian: ``apt-get install -y chromium``).

The build executes the tutorials (docs/_gen/hooks.py, cached under .cache/ by content), so every
tutorial page must show its outputs: at least one figure that the browser decodes to a non-zero size,
typeset math, no error output and the note saying in which mode it ran. The solutions pages show their
code without outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocs_jupyter")
pytest.importorskip("mkdocstrings_handlers.python")

pytestmark = pytest.mark.slow  # one strict build: about 10 s warm; cold, it executes every tutorial

ROOT = Path(__file__).resolve().parents[2]
MATH_PAGE = "concepts/forward-process.html"  # display and inline math, and a figure
FIGURE_PAGE = "concepts/schedules.html"
NOTEBOOK_PAGE = "tutorials/01_forward_process.html"  # math in Jupyter's $...$ form
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

# a reference to another host that the browser would load by itself (links in prose are fine)
_REMOTE = r"""["'](?:https?:)?//"""
REMOTE_LOADS = {
    "script": re.compile(r"<script\b[^>]*\bsrc=" + _REMOTE, re.IGNORECASE),
    "stylesheet or preload": re.compile(r"<link\b[^>]*\bhref=" + _REMOTE, re.IGNORECASE),
    "image": re.compile(r"<(?:img|source|video|audio|iframe)\b[^>]*\bsrc=" + _REMOTE, re.IGNORECASE),
    "module import": re.compile(r"""\bimport\s*\(?\s*["'](?:https?:)?//"""),
    "css import or url": re.compile(r"""@import\s+(?:url\()?["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//"""),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "DIFFUSION_NP_QUICK": "1"},  # quick mode: a fast check
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_every_nav_section_is_built(site):
    for page in ["index.html", "getting-started.html", MATH_PAGE, FIGURE_PAGE, "glossary.html",
                 "verification.html", "performance.html", "tutorials/index.html", "api/nn.html"]:  # fmt: skip
        assert (site / page).is_file(), page
    notebooks = sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks, "no tutorials found"
    for stem in notebooks:
        assert (site / "tutorials" / f"{stem}.html").is_file(), f"tutorial {stem} not rendered"


def _tutorial_stems() -> list[str]:
    return sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))


_OUTPUT = re.compile(r'<div class="[^"]*\bjp-OutputArea-output\b')  # a rendered cell output (not the CSS)

# Notebook markdown that MathJax accepts but KaTeX does not; each entry is a bug to fix in the notebook,
# tolerated here (not required) so that the site's other checks keep running meanwhile.
KNOWN_TEX_ERRORS: dict[str, str] = {}


def test_tutorial_pages_are_executed_and_solutions_are_not(site):
    for stem in _tutorial_stems():
        html = (site / "tutorials" / f"{stem}.html").read_text(encoding="utf-8")
        assert _OUTPUT.search(html), f"tutorial {stem} has no outputs"
        assert re.search(r"<img\b[^>]*\bsrc=\"data:image/png;base64,", html), f"tutorial {stem} shows no figure"
        assert re.search(r"executed while the documentation was built, in <strong>(quick|full) mode", html), \
            f"tutorial {stem} does not say in which mode it ran"
        solution = site / "tutorials" / "solutions" / f"{stem}_solutions.html"
        if solution.is_file():
            assert not _OUTPUT.search(solution.read_text(encoding="utf-8")), f"{solution.name} has outputs"


def _hooks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("site_hooks", ROOT / "docs" / "_gen" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failing_notebook_fails_the_build_naming_the_notebook_and_cell(tmp_path, monkeypatch):
    import nbformat
    from mkdocs.exceptions import PluginError

    hooks = _hooks()
    monkeypatch.setattr(hooks, "CACHE", tmp_path / "cache")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Broken"),
                                         nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("raise ValueError('boom')")])  # fmt: skip
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(PluginError) as err:
        hooks.execute_tutorial(path, "quick", "digest")
    message = str(err.value)
    assert "99_broken.ipynb" in message and "cell 2" in message and "boom" in message, message
    assert not list((tmp_path / "cache").glob("*.ipynb")), "a failed run must not be cached"


def test_full_mode_only_where_the_readme_gives_under_five_minutes(monkeypatch):
    hooks = _hooks()
    monkeypatch.delenv("DIFFUSION_NP_QUICK", raising=False)
    times = hooks.full_mode_seconds()
    assert times, "no full-mode times parsed from tutorials/README.md"
    for stem, seconds in times.items():
        assert hooks.notebook_mode(hooks.TUTORIALS / f"{stem}.ipynb") == ("full" if seconds < 300 else "quick")
    assert hooks.notebook_mode(hooks.TUTORIALS / "99_not_in_the_table.ipynb") == "quick"
    monkeypatch.setenv("DIFFUSION_NP_QUICK", "1")
    assert {hooks.notebook_mode(hooks.TUTORIALS / f"{stem}.ipynb") for stem in times} == {"quick"}


def test_article_to_code_page_is_bilingual_and_linked(site):
    html = (site / "article-to-code.html").read_text(encoding="utf-8")
    for words in ("前向扩散", "Forward and reverse diffusion", "尚未实现", "not yet in the project", "ELBO"):
        assert words in html, words
    assert 'href="article-to-code.html' in (site / "glossary.html").read_text(encoding="utf-8")


def test_api_reference_renders_docstrings(site):
    html = (site / "api" / "schedules.html").read_text(encoding="utf-8")
    assert "doc-class" in html and "doc-function" in html, "mkdocstrings rendered no classes or functions"
    assert 'id="diffusion_np.schedules.NoiseSchedule"' in html
    assert 'id="diffusion_np.schedules.make_betas"' in html


def test_nothing_is_loaded_from_another_host(site):
    offenders = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in (".html", ".css", ".js") or not path.is_file():
            continue
        if path.suffix == ".js" and path.name.endswith(".min.js"):
            continue  # vendored bundles (KaTeX, the theme) mention URLs in comments and strings
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, pattern in REMOTE_LOADS.items():
            for match in pattern.finditer(text):
                offenders.append(f"{path.relative_to(site)}: {what}: {text[match.start() : match.start() + 100]!r}")
    assert not offenders, "pages load resources from other hosts:\n" + "\n".join(offenders[:20])


def test_no_web_fonts_or_cdn_mentioned_in_pages(site):
    for path in site.rglob("*.html"):
        text = path.read_text(encoding="utf-8")
        for host in ("fonts.googleapis.com", "fonts.gstatic.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com",
                     "unpkg.com", "polyfill.io"):  # fmt: skip
            assert host not in text, f"{path.relative_to(site)} mentions {host}"


def test_figures_exist_and_are_referenced(site):
    committed = sorted(p.name for p in (ROOT / "docs" / "img").glob("*.png"))
    assert committed, "docs/img holds no figures"
    referenced = set()
    for page in site.rglob("*.html"):
        for src in re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", page.read_text(encoding="utf-8")):
            if src.startswith("data:"):
                continue
            target = (page.parent / src.split("#")[0].split("?")[0]).resolve()
            assert target.is_file(), f"{page.relative_to(site)} shows {src}, which is not in the site"
            referenced.add(target.name)
    for name in committed:
        assert (site / "img" / name).is_file(), name
        assert name in referenced, f"docs/img/{name} is on no page"


def test_katex_is_vendored(site):
    katex = site / "assets" / "katex"
    for name in ["katex.min.js", "katex.min.css", "contrib/auto-render.min.js", "fonts/KaTeX_Main-Regular.woff2"]:
        assert (katex / name).is_file(), name


# ---- in a real browser ----------------------------------------------------------------------------


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


needs_chromium = pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install -y chromium)")

# Appended to our copy of a page: after the load event (all images done, KaTeX run), write what the
# browser saw into the DOM, where --dump-dom shows it.
_PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const pre = document.createElement("pre");
  pre.id = "site-probe";
  pre.textContent = JSON.stringify({
    images: [...document.querySelectorAll("article img")].map(i => [i.getAttribute("src"), i.naturalWidth]),
    katex: document.querySelectorAll(".katex").length,
    errors: document.querySelectorAll(".katex-error").length,
    stderr: [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(e => e.textContent).filter(t => /Traceback|Error\b|Exception/.test(t)).map(t => t.slice(0, 300)),
  });
  document.body.appendChild(pre);
}, 300));
</script>"""


class _VisibleText(HTMLParser):
    """Text of the main article without code, scripts, styles or KaTeX's TeX annotations."""

    SKIP = {"script", "style", "code", "pre", "annotation", "textarea"}

    def __init__(self):
        super().__init__()
        self.depth, self.skip, self.parts = 0, 0, []

    def handle_starttag(self, tag, attrs):
        if tag == "article":
            self.depth += 1
        if tag in self.SKIP:
            self.skip += 1

    def handle_endtag(self, tag):
        if tag == "article":
            self.depth -= 1
        if tag in self.SKIP and self.skip:
            self.skip -= 1

    def handle_data(self, data):
        if self.depth and not self.skip:
            self.parts.append(data)


def _render(site: Path, page: str) -> tuple[dict, str]:
    """Open ``page`` (a probed copy of it) in headless Chromium; return (probe result, visible text)."""
    source = site / page
    probed = source.with_name(f"_probe_{source.name}")  # same folder: relative links still resolve
    probed.write_text(source.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    dom = proc.stdout
    match = re.search(r'<pre id="site-probe">(.*?)</pre>', dom, re.DOTALL)
    assert match, f"the page did not finish loading in Chromium (rc {proc.returncode}): {proc.stderr[-2000:]}"
    result = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    parser = _VisibleText()
    parser.feed(dom)
    return result, " ".join(parser.parts)


def _assert_typeset(result: dict, text: str, page: str, min_katex: int) -> None:
    assert result["katex"] >= min_katex, f"{page}: only {result['katex']} KaTeX elements"
    assert result["errors"] == 0, f"{page}: {result['errors']} KaTeX errors"
    for raw in ("\\(", "\\)", "\\[", "\\]", "$$"):
        at = text.find(raw)
        assert at < 0, f"{page}: raw {raw!r} left in the visible text: ...{text[max(0, at - 80) : at + 80]}..."


@needs_chromium
def test_math_is_typeset_and_figures_load_in_a_browser(site):
    for page in (MATH_PAGE, FIGURE_PAGE):
        result, text = _render(site, page)
        _assert_typeset(result, text, page, min_katex=10)
        assert result["images"], f"{page}: no figure"
        for src, width in result["images"]:
            assert width > 0, f"{page}: figure {src} did not load"


@needs_chromium
def test_notebook_math_is_typeset_in_a_browser(site):
    if not (site / NOTEBOOK_PAGE).is_file():
        pytest.skip(f"{NOTEBOOK_PAGE} is not in the site")
    result, text = _render(site, NOTEBOOK_PAGE)
    _assert_typeset(result, text, NOTEBOOK_PAGE, min_katex=10)


@pytest.fixture(scope="module")
def rendered_tutorials(site) -> dict[str, tuple[dict, str]]:
    if _chromium() is None:
        pytest.skip("needs chromium (apt-get install -y chromium)")
    return {stem: _render(site, f"tutorials/{stem}.html") for stem in _tutorial_stems()}


def test_every_tutorial_shows_a_figure_and_no_error_in_a_browser(rendered_tutorials):
    for stem, (result, _) in rendered_tutorials.items():
        widths = [width for _, width in result["images"]]
        assert any(w > 0 for w in widths), f"{stem}: no figure of non-zero natural size ({result['images'][:5]})"
        assert all(w > 0 for w in widths), f"{stem}: a figure did not load ({result['images']})"
        assert not result["stderr"], f"{stem}: error output on the page: {result['stderr'][:3]}"


def test_every_tutorial_has_its_math_typeset_in_a_browser(rendered_tutorials):
    for stem, (result, text) in rendered_tutorials.items():
        if stem in KNOWN_TEX_ERRORS:
            result = {**result, "errors": 0}  # see KNOWN_TEX_ERRORS
        cells = json.loads((ROOT / "tutorials" / f"{stem}.ipynb").read_text(encoding="utf-8"))["cells"]
        has_math = any("$" in "".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        _assert_typeset(result, text, stem, min_katex=1 if has_math else 0)
