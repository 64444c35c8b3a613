"""Static checks of the tutorial notebooks (they are executed separately, by ``pytest --nbmake``).

Every notebook in tutorials/ and tutorials/solutions/ must

* declare the ``python3`` kernel (any other name fails with NoSuchKernel where only ipykernel is installed);
* carry no stored error output (a notebook committed mid-crash);
* start its code with the QUICK switch, so the automated run can ask for a short version;
* not force the Agg backend (the rendered docs pages would lose their figures).

And every tutorial has a solutions notebook next to it (STYLE.md rule 10).
"""

import json
import re
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb")) + sorted((TUTORIALS / "solutions").glob("*.ipynb"))
# QUICK = os.environ.get("DIFFUSION_NP_QUICK") == "1", at the start of a line, quotes and spaces free
QUICK_SWITCH = re.compile(
    r"""^QUICK\s*=\s*os\.environ\.get\(\s*["']DIFFUSION_NP_QUICK["']\s*\)\s*==\s*["']1["']""", re.M
)
FORCE_AGG = re.compile(r"""matplotlib\.use\(\s*["']agg["']|MPLBACKEND""", re.I)


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _ids(paths):
    return [str(p.relative_to(TUTORIALS)) for p in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks found under {TUTORIALS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_kernelspec_is_python3(path):
    spec = _load(path).get("metadata", {}).get("kernelspec", {})
    assert spec.get("name") == "python3", f"{path.name}: kernelspec name must be 'python3', got {spec.get('name')!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_no_stored_errors(path):
    for i, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", (
                f"{path.name}: cell {i} has a stored error output ({out.get('ename')}: {out.get('evalue')}); "
                "clear the outputs before committing"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_first_code_cell_has_quick_switch(path):
    code = [_source(c) for c in _load(path)["cells"] if c["cell_type"] == "code"]
    assert code, f"{path.name}: no code cells"
    assert QUICK_SWITCH.search(code[0]), (
        f'{path.name}: the first code cell must set QUICK = os.environ.get("DIFFUSION_NP_QUICK") == "1"'
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_does_not_force_agg_backend(path):
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "code":
            assert not FORCE_AGG.search(_source(cell)), f"{path.name}: cell {i} forces a non-inline backend"


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=_ids(sorted(TUTORIALS.glob("*.ipynb"))))
def test_tutorial_has_solutions(path):
    solutions = TUTORIALS / "solutions" / f"{path.stem}_solutions.ipynb"
    assert solutions.exists(), f"{path.name}: expected its solutions in {solutions.relative_to(TUTORIALS.parent)}"
