"""MkDocs hooks for the diffusion_np site (registered in mkdocs.yml under ``hooks:``).

1. The tutorials live in ``tutorials/`` at the top of the repository, not in ``docs/``.
   ``on_config`` lists every ``tutorials/NN_*.ipynb`` (and its solutions notebook) under the
   "Tutorials" entry of the nav, titled by the notebook's first heading, and ``on_files``
   hands those notebooks to mkdocs-jupyter. A new notebook therefore appears on the site
   without editing mkdocs.yml.
2. nbconvert's HTML template adds ``<script>`` tags that load MathJax and Mermaid from
   CDNs. The site must work offline (math is typeset by the KaTeX copy in docs/assets), so
   ``on_post_page`` drops from notebook pages every script that would load code from another
   host, and MathJax's configuration (KaTeX typesets the notebooks' math instead).

The notebooks are rendered as committed (without outputs); the test suite executes them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
NAV_SECTION = "Tutorials"

_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.IGNORECASE | re.DOTALL)
_REMOTE_SRC = re.compile(r"""\bsrc=["'](?:https?:)?//|\bsrc=["']\s*["']""", re.IGNORECASE)
_REMOTE_IMPORT = re.compile(r"""(?:\bimport\s*\(|\bfrom)\s*["'](?:https?:)?//""")


def _drop_remote_script(match: re.Match) -> str:
    """'' for a script that would load code from another host (or MathJax's config), else the script."""
    attrs, body = match.group(1), match.group(2)
    if _REMOTE_SRC.search(attrs) or _REMOTE_IMPORT.search(body) or "x-mathjax-config" in attrs:
        return ""
    return match.group(0)


def tutorial_notebooks() -> list[Path]:
    """The numbered tutorials and their solutions, in reading order."""
    notebooks = []
    for nb in sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb")):
        notebooks.append(nb)
        solution = TUTORIALS / "solutions" / f"{nb.stem}_solutions.ipynb"
        if solution.exists():
            notebooks.append(solution)
    return notebooks


def _title(nb: Path) -> str:
    """The first markdown heading of a notebook, or its file name."""
    for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for line in "".join(cell["source"]).splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return nb.stem


def _src_uri(nb: Path) -> str:
    return nb.relative_to(ROOT).as_posix()  # e.g. tutorials/solutions/01_forward_process_solutions.ipynb


def on_config(config):
    entries = []
    for nb in tutorial_notebooks():
        title = _title(nb)
        if nb.parent.name == "solutions":
            title = f"Solutions to {nb.stem[:2]}"
        entries.append({title: _src_uri(nb)})
    for item in config["nav"] or []:
        if isinstance(item, dict) and NAV_SECTION in item:
            item[NAV_SECTION] = list(item[NAV_SECTION]) + entries
            break
    else:
        raise ValueError(f"mkdocs.yml nav needs a '{NAV_SECTION}' section for the notebooks")
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files turns .ipynb files into pages
def on_files(files, config):
    for nb in tutorial_notebooks():
        files.append(
            File(
                _src_uri(nb),
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_post_page(output, page, config):
    if not page.file.src_uri.endswith(".ipynb"):
        return output
    return _SCRIPT.sub(_drop_remote_script, output)
