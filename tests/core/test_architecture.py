"""The layers of docs/architecture.md held to the code's own imports, and its layout (and README's) to the tree.

Imports are read with the AST from the source, those inside functions included (a lazy import is still an
import), so nothing is imported or run here.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    """Every ``tagi_ds`` module ``path`` imports: ``from tagi_ds import train`` counts as ``tagi_ds.train``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m == "tagi_ds" or m.startswith("tagi_ds.")}


def files(*places: str, but: tuple[str, ...] = ()) -> list[Path]:
    found = []
    for place in places:
        p = REPO / place
        found += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return [f for f in found if str(f.relative_to(REPO)) not in but]


def reaching(sources: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """``file -> module`` for every import of a forbidden package (or module) by ``sources``."""
    return [f"{f.relative_to(REPO)} -> {m}" for f in sources for m in sorted(imports(f))
            if any(m == bad or m.startswith(bad + ".") for bad in forbidden)]


CORE = ("tagi_ds/config.py", "tagi_ds/stages.py", "tagi_ds/recipes.py", "tagi_ds/batch.py", "tagi_ds/ops.py",
        "tagi_ds/losses.py", "tagi_ds/model.py", "tagi_ds/adapters", "tagi_ds/backbones", "tagi_ds/hypernet",
        "tagi_ds/data")
ABOVE_CORE = ("tagi_ds.runtime", "tagi_ds.train", "tagi_ds.eval", "tagi_ds.export", "tagi_ds.plan", "tagi_ds.cli",
              "tagi_ds.artifact_flags", "tagi_ds.artifacts")
RULES = [  # (what, the files, the packages or modules they must not import)
    ("evaluation, export, the planner, artifacts, benchmarks and scripts share the runtime layer, not train/",
     files("tagi_ds/eval", "tagi_ds/export", "tagi_ds/plan", "tagi_ds/artifacts.py", "benchmarks", "scripts"),
     ("tagi_ds.train",)),
    ("runtime/ sits below the work and the CLI",
     files("tagi_ds/runtime"),
     ("tagi_ds.train", "tagi_ds.eval", "tagi_ds.export", "tagi_ds.plan", "tagi_ds.cli", "tagi_ds.artifact_flags",
      "tagi_ds.artifacts")),
    ("evaluation and export know no flags",
     files("tagi_ds/eval", "tagi_ds/export"),
     ("tagi_ds.cli", "tagi_ds.artifact_flags")),
    ("the model and its data know no processes, DeepSpeed glue, artifacts or flags",
     files(*CORE, but=("tagi_ds/data/__main__.py",)),  # python -m tagi_ds.data: an entry point
     ABOVE_CORE),
]


@pytest.mark.parametrize("what, sources, forbidden", RULES, ids=[r[0].split(",")[0] for r in RULES])
def test_imports_follow_the_layers(what, sources, forbidden):
    assert sources, what
    assert reaching(sources, forbidden) == [], what


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from tagi_ds import train\n\ndef f():\n    from tagi_ds.train.loop import run\n")
    assert {"tagi_ds.train", "tagi_ds.train.loop", "tagi_ds.train.loop.run"} <= imports(f)


# -- the layout blocks of README.md and docs/architecture.md against the tree --------------------------------------
def layout(doc: str, heading: str) -> list[str]:
    """The paths a layout block names: one entry a line, two spaces of indent per level under a folder."""
    text = (REPO / doc).read_text(encoding="utf-8")
    block = text[text.index(heading):]
    block = block[block.index("```\n") + 4:]
    block = block[:block.index("```\n")]
    paths, parents = [], []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent >= 8:  # a description's continuation
            continue
        level, name = indent // 2, line.split()[0]
        parents = parents[:level]
        paths.append("".join(parents) + name)
        if name.endswith("/"):
            parents.append(name)
    return paths


def tracked() -> set[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.parametrize("doc, heading", [("README.md", "## Layout"), ("docs/architecture.md", "## Who owns what")])
def test_layout_names_what_the_tree_holds(doc, heading):
    named = layout(doc, heading)
    in_tree = tracked()
    for path in named:  # every path it names exists
        assert (REPO / path).exists() and (path.endswith("/") == (REPO / path).is_dir()), f"{doc}: {path}"
    package = {p.split("/")[1] + ("/" if p.count("/") > 1 else "") for p in in_tree
               if p.startswith("tagi_ds/") and not p.endswith("/__init__.py")}
    top = {p.split("/")[0] + "/" for p in in_tree if "/" in p and not p.startswith(".")}
    covered = {p.removeprefix("tagi_ds/") for p in named if p.startswith("tagi_ds/")}
    assert package <= covered, f"{doc} does not name {sorted(package - covered)}"
    assert top <= {p.split("/")[0] + "/" for p in named}, f"{doc} does not name {sorted(top - set(named))}"


# -- where a run's adapters come from is asked of its source (tagi_ds/stages.py), not re-derived from a name ------
MODE_WORDS = {"tagi", "concat", "no_instruction", "teacher",  # stages.MODES' names
              "generated", "shared", "per_task"}  # the adapter sources' old Literal values
NOT_MODES = ("input_view", "generator")  # a view name and the hypernet's generator kind share words with modes


def mode_dispatches(places: tuple[str, ...] = ("tagi_ds", "launchers"),
                    but: tuple[str, ...] = ("tagi_ds/stages.py",)) -> list[str]:
    """``file:line`` of every comparison that dispatches on a mode or an adapter source by name outside
    stages.py: ``x == "tagi"``, ``mode in ("tagi", ...)``, or anything compared with a ``.adapters`` attribute."""
    def words(node: ast.AST) -> bool:
        elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(e, ast.Constant) and e.value in MODE_WORDS for e in elts)

    out = []
    for f in (g for place in places for g in sorted((REPO / place).rglob("*.py"))):
        if f.is_relative_to(REPO) and str(f.relative_to(REPO)) in but:
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            if any(n in ast.unparse(s) for s in sides for n in NOT_MODES):
                continue
            if any(words(s) for s in sides) or any(isinstance(s, ast.Attribute) and s.attr == "adapters"
                                                   for s in sides):
                out.append(f"{f.relative_to(REPO) if f.is_relative_to(REPO) else f}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_mode_dispatches_stay_in_stages():
    found = mode_dispatches()
    assert len(found) <= 16, "ask the mode's adapter source (tagi_ds.stages), not its name:\n" + "\n".join(found)


def test_the_dispatch_counter_sees_names_and_sources(tmp_path):
    (tmp_path / "m.py").write_text('if m.adapters == "x" or mode in ("tagi", "y") or v == "concat":\n    pass\n'
                                   'if self.input_view == "concat" or cfg.generator == "shared":\n    pass\n')
    assert len(mode_dispatches((str(tmp_path),), ())) == 3  # each Compare of the first line; views skipped
