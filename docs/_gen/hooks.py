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
3. The tutorials are committed without outputs; the site shows them executed. ``on_files``
   runs each ``tutorials/NN_*.ipynb`` with nbclient (kernel ``python3`` on this interpreter,
   ``PYTHONPATH`` = this checkout) and hands mkdocs-jupyter the executed copy. The solutions
   are not executed: their pages show the answers' code without outputs, and no tutorial page
   shows any of them.

   Mode: a notebook runs in full mode when the "full (s)" column of tutorials/README.md says its
   slowest full run is under 5 minutes, in quick mode (``DIFFUSION_NP_QUICK=1``) otherwise or
   when it is not in the table; ``DIFFUSION_NP_QUICK=1`` in the environment (as ``make test``
   sets it) makes every notebook quick. A cell at the top of each page says which mode ran.

   Cache: an executed notebook is kept in ``.cache/executed-notebooks/`` under a key hashed from
   the notebook, the mode and every file of ``diffusion_np/``; an unchanged notebook is not run
   again, so a warm build takes seconds while a change to the library re-runs every tutorial.
   This is why ``make test`` runs each tutorial once: the strict site build in tests/docs
   executes them (quick mode), and nbmake runs only the solutions.

   An execution error stops the build, naming the notebook and the failing cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
NAV_SECTION = "Tutorials"
LIBRARY = ROOT / "diffusion_np"
CACHE = ROOT / ".cache" / "executed-notebooks"
STAGE = ROOT / ".cache" / "site-notebooks"  # executed copies, laid out as tutorials/NN_*.ipynb
FULL_LIMIT_S = 300.0  # full mode when the README's slowest full run is under 5 minutes
CELL_TIMEOUT_S = 900

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
    if not nb.is_relative_to(ROOT):
        return nb.as_posix()
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


# ---- executing the tutorials ----------------------------------------------------------------------


def full_mode_seconds() -> dict[str, float]:
    """Slowest full-mode run of each notebook, from the table in tutorials/README.md (stem -> s)."""
    times = {}
    readme = TUTORIALS / "README.md"
    if not readme.is_file():
        return times
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.match(r"\[(\d\d_\w+)\]", cells[0]) if len(cells) >= 4 else None
        numbers = re.findall(r"\d+(?:\.\d+)?", cells[-1]) if name else []
        if numbers:
            times[name.group(1)] = max(float(n) for n in numbers)
    return times


def notebook_mode(nb: Path) -> str:
    """'quick' or 'full' for one tutorial (see the module docstring)."""
    if os.environ.get("DIFFUSION_NP_QUICK") == "1":
        return "quick"
    seconds = full_mode_seconds().get(nb.stem)
    return "full" if seconds is not None and seconds < FULL_LIMIT_S else "quick"


def library_digest() -> str:
    """Hash of every file of the library (sources, configs, shipped weights), names included."""
    h = hashlib.sha256()
    for path in sorted(LIBRARY.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _kernel_manager():
    """A ``python3`` kernel on this interpreter (the spec's bare ``python`` would follow PATH)."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    spec = km.kernel_spec  # cached on the manager, so changing it changes what starts
    if spec.argv and Path(spec.argv[0]).name.startswith("python"):
        spec.argv[0] = sys.executable
    return km


def _mode_cell(mode: str, seconds: float):
    import nbformat

    how = "**full mode**"
    if mode == "quick":
        how = "**quick mode** (`DIFFUSION_NP_QUICK=1`: fewer samples and training steps; the same figures)"
    text = (f"*This page was executed while the documentation was built, in {how}, "
            f"in {seconds:.0f} s on the build machine. Its outputs are computed, not committed. "
            "Run it yourself with `make lab`.*")  # fmt: skip
    return nbformat.v4.new_markdown_cell(text, metadata={"tags": ["site-build-mode"]})


def execute_tutorial(nb_path: Path, mode: str, digest: str) -> Path:
    """The executed copy of ``nb_path`` (from the cache when its key matches); raises PluginError on an error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    key = hashlib.sha256(nb_path.read_bytes() + mode.encode() + digest.encode()).hexdigest()[:20]
    cached = CACHE / f"{nb_path.stem}-{mode}-{key}.ipynb"
    if cached.is_file():
        return cached
    nb = nbformat.read(nb_path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the inline backend keeps the figures
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("DIFFUSION_NP_QUICK", None)
    if mode == "quick":
        env["DIFFUSION_NP_QUICK"] = "1"
    client = NotebookClient(nb, km=_kernel_manager(), timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(TUTORIALS)}})  # fmt: skip
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except CellExecutionError as err:
        failing = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
            o.get("output_type") == "error" for o in c.get("outputs", []))), None)  # fmt: skip
        where = f"cell {failing} (counting from 0)" if failing is not None else "a cell"
        raise PluginError(f"tutorial {_src_uri(nb_path)} failed to execute ({mode} mode) in {where}:\n{err}") from None
    except Exception as err:  # a dead kernel, a timeout
        raise PluginError(f"tutorial {_src_uri(nb_path)} could not be executed ({mode} mode): {err!r}") from None
    nb.cells.insert(1 if nb.cells and nb.cells[0].cell_type == "markdown" else 0,
                    _mode_cell(mode, time.perf_counter() - start))  # fmt: skip
    CACHE.mkdir(parents=True, exist_ok=True)
    for old in CACHE.glob(f"{nb_path.stem}-{mode}-*.ipynb"):
        old.unlink()  # one cached copy a notebook and mode: make site (full) and make test (quick) both stay warm
    tmp = cached.with_suffix(".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(cached)
    return cached


def staged_notebooks() -> dict[Path, Path]:
    """Every notebook of the site -> the file the site renders: executed tutorials, solutions as committed."""
    digest = library_digest()
    staged = {}
    for nb in tutorial_notebooks():
        target = STAGE / _src_uri(nb)
        target.parent.mkdir(parents=True, exist_ok=True)
        source = nb if nb.parent.name == "solutions" else execute_tutorial(nb, notebook_mode(nb), digest)
        data = source.read_bytes()
        if not target.is_file() or target.read_bytes() != data:  # unchanged files keep their mtime
            target.write_bytes(data)
        staged[nb] = target
    return staged


@event_priority(100)  # before mkdocs-jupyter's on_files turns .ipynb files into pages
def on_files(files, config):
    staged = staged_notebooks()
    for nb in staged:
        files.append(
            File(
                _src_uri(nb),
                src_dir=str(STAGE),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_post_page(output, page, config):
    if not page.file.src_uri.endswith(".ipynb"):
        return output
    return _SCRIPT.sub(_drop_remote_script, output)
