"""The layers of docs/architecture.md held to the code's own imports, and its layout (and README's) to the tree.

Imports are read with the AST from the source, those inside functions included (a lazy import is still an
import), so nothing is imported or run here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
    return [
        f"{f.relative_to(REPO)} -> {m}"
        for f in sources
        for m in sorted(imports(f))
        if any(m == bad or m.startswith(bad + ".") for bad in forbidden)
    ]


def module_name(path: Path) -> str:
    """``tagi_ds/plan/cli.py`` -> ``tagi_ds.plan.cli``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``paths`` it imports, lazy imports included. ``from tagi_ds.backbones import t5``
    is an edge to ``tagi_ds.backbones.t5``, ``from tagi_ds.plan import count`` to ``tagi_ds.plan`` (the longest
    imported prefix that is one of the modules). Only the imports the code writes: the parent packages Python
    runs first are left out, or every package ``__init__`` that re-exports a submodule would make a cycle."""
    modules = {module_name(p): p for p in paths}

    def known(m: str) -> str:
        while m and m not in modules:
            m = m.rpartition(".")[0]
        return m

    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else known(node.module)
                    for a in node.names
                }
        graph[name] = {m for m in targets if m and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected component of more than one module (Tarjan),
    sorted, so that a failure names every module of the cycle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


CORE = (
    "tagi_ds/errors.py",
    "tagi_ds/files.py",
    "tagi_ds/families.py",
    "tagi_ds/op_impls.py",
    "tagi_ds/config.py",
    "tagi_ds/stages.py",
    "tagi_ds/recipes.py",
    "tagi_ds/batch.py",
    "tagi_ds/ops.py",
    "tagi_ds/losses.py",
    "tagi_ds/loss_terms.py",
    "tagi_ds/model.py",
    "tagi_ds/adapters",
    "tagi_ds/backbones",
    "tagi_ds/hypernet",
    "tagi_ds/data",
)
ABOVE_CORE = (
    "tagi_ds.runtime",
    "tagi_ds.train",
    "tagi_ds.eval",
    "tagi_ds.export",
    "tagi_ds.plan",
    "tagi_ds.cli",
    "tagi_ds.artifact_flags",
    "tagi_ds.artifacts",
)
RULES = [  # (what, the files, the packages or modules they must not import)
    (
        "evaluation, export, the planner, the server, artifacts, benchmarks and scripts share the runtime layer, not "
        "train/",
        files(
            "tagi_ds/eval",
            "tagi_ds/export",
            "tagi_ds/plan",
            "tagi_ds/serve",
            "tagi_ds/artifacts.py",
            "benchmarks",
            "scripts",
        ),
        ("tagi_ds.train",),
    ),
    (
        "runtime/ sits below the work and the CLI",
        files("tagi_ds/runtime"),
        (
            "tagi_ds.train",
            "tagi_ds.eval",
            "tagi_ds.export",
            "tagi_ds.plan",
            "tagi_ds.cli",
            "tagi_ds.artifact_flags",
            "tagi_ds.artifacts",
            "tagi_ds.launch",
        ),
    ),
    (
        "no arrow from the work or the layers below it up to the CLI or the launcher (entry points of lower layers,"
        " python -m tagi_ds.plan and python -m tagi_ds.data, parse with runtime/flags.py)",
        files(
            *CORE,
            "tagi_ds/runtime",
            "tagi_ds/artifacts.py",
            "tagi_ds/train",
            "tagi_ds/eval",
            "tagi_ds/export",
            "tagi_ds/plan",
        ),
        ("tagi_ds.cli", "tagi_ds.artifact_flags", "tagi_ds.launch"),
    ),
    (
        "evaluation, export and the server know no flags",
        files("tagi_ds/eval", "tagi_ds/export", "tagi_ds/serve", but=("tagi_ds/serve/__main__.py",)),
        ("tagi_ds.cli", "tagi_ds.artifact_flags"),
    ),
    (
        "the model and its data know no processes, DeepSpeed glue, artifacts or flags",
        files(*CORE, but=("tagi_ds/data/__main__.py",)),  # python -m tagi_ds.data: an entry point
        ABOVE_CORE,
    ),
]


@pytest.mark.parametrize("record", ["tagi_ds/families.py", "tagi_ds/op_impls.py"])
def test_the_record_modules_import_the_standard_library_only(record):
    """Every layer reads a family's or an op implementation's record: no torch, nothing of tagi_ds."""
    tree = ast.parse((REPO / record).read_text(encoding="utf-8"))
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert {m.split(".")[0] for m in names} <= set(sys.stdlib_module_names) | {"__future__"}, names


@pytest.mark.parametrize("what, sources, forbidden", RULES, ids=[r[0].split(",")[0] for r in RULES])
def test_imports_follow_the_layers(what, sources, forbidden):
    assert sources, what
    assert reaching(sources, forbidden) == [], what


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from tagi_ds import train\n\ndef f():\n    from tagi_ds.train.loop import run\n")
    assert {"tagi_ds.train", "tagi_ds.train.loop", "tagi_ds.train.loop.run"} <= imports(f)


def test_no_import_cycles():
    """No cycle among the package's modules, lazy imports included: a cycle ties layers (or two modules of one
    layer) together so that neither can be read, tested or changed alone (it was cli -> train/loop -> plan ->
    plan/cli -> cli, because plan/__init__.py re-exported the planner's command line)."""
    assert cycles(import_graph(files("tagi_ds"))) == []


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import(tmp_path, monkeypatch):
    pkg = tmp_path / "tagi_ds"
    (pkg / "plan").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli.py").write_text("def main():\n    from tagi_ds.train import loop\n")
    (pkg / "train").mkdir()
    (pkg / "train" / "loop.py").write_text("from tagi_ds import plan\n")
    (pkg / "plan" / "__init__.py").write_text("from tagi_ds.plan.cli import main\n")
    (pkg / "plan" / "cli.py").write_text("from tagi_ds.cli import Parser\nfrom tagi_ds.plan import fit\n")
    (pkg / "plan" / "fit.py").write_text("import json\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = cycles(import_graph(files("tagi_ds")))
    assert found == [["tagi_ds.cli", "tagi_ds.plan", "tagi_ds.plan.cli", "tagi_ds.train.loop"]]


# -- the layout blocks of README.md and docs/architecture.md against the tree --------------------------------------
def layout(doc: str, heading: str) -> list[str]:
    """The paths a layout block names: one entry a line, two spaces of indent per level under a folder."""
    text = (REPO / doc).read_text(encoding="utf-8")
    block = text[text.index(heading) :]
    block = block[block.index("```\n") + 4 :]
    block = block[: block.index("```\n")]
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
    package = {
        p.split("/")[1] + ("/" if p.count("/") > 1 else "")
        for p in in_tree
        if p.startswith("tagi_ds/") and not p.endswith("/__init__.py")
    }
    top = {p.split("/")[0] + "/" for p in in_tree if "/" in p and not p.startswith(".")}
    covered = {p.removeprefix("tagi_ds/") for p in named if p.startswith("tagi_ds/")}
    assert package <= covered, f"{doc} does not name {sorted(package - covered)}"
    assert top <= {p.split("/")[0] + "/" for p in named}, f"{doc} does not name {sorted(top - set(named))}"


# -- what a backbone family is, is read from its record (tagi_ds/families.py), not re-derived from its name -------
ARCH_WORDS = {"t5", "llama", "mistral", "qwen2", "gemma2"}  # the model.arch names of the built-in families
ARCH_LISTS = {"DECODER_ONLY", "ARCHS", "Arch"}  # the old hand-made lists of families (config.py, data/collate.py)
ARCH_PLACES = ("tagi_ds", "launchers", "benchmarks", "scripts")


def arch_tests(root: Path = REPO, places: tuple[str, ...] = ARCH_PLACES, but: str = "tagi_ds/backbones/") -> list[str]:
    """``file:line`` of every line outside ``but`` that tests a family by name: a comparison or ``in`` test
    against an arch literal (``arch == "t5"``, ``arch in ("t5", "llama")``), a dict keyed by one, a subscript by
    one (``Literal["t5", ...]``), or a use of a hand-made family list (not its import: one line per use).
    On the tree before the Family record (9d51a8d..6ebef81): 43 in tagi_ds/ + launchers/ (11 files, 21 in
    plan/), 47 with benchmarks/ and scripts/."""

    def named(node: ast.AST) -> bool:
        elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(isinstance(e, ast.Constant) and e.value in ARCH_WORDS for e in elts)

    out: dict[tuple[str, int], str] = {}  # (file, line) -> the line: a line counts once
    for f in (g for place in places for g in sorted((root / place).rglob("*.py"))):
        rel = str(f.relative_to(root))
        if rel.startswith(but):
            continue
        text = f.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if (
                (isinstance(node, ast.Compare) and any(named(s) for s in (node.left, *node.comparators)))
                or (isinstance(node, ast.Dict) and any(k is not None and named(k) for k in node.keys))
                or (isinstance(node, ast.Subscript) and named(node.slice))
                or (isinstance(node, ast.Name) and node.id in ARCH_LISTS)
            ):
                out[(rel, node.lineno)] = text.splitlines()[node.lineno - 1].strip()
    return [f"{rel}:{line}: {code}" for (rel, line), code in sorted(out.items())]


def test_families_are_read_from_their_record_not_tested_by_name():
    found = arch_tests()
    assert len(found) == 0, "read the family's record (tagi_ds.families.get(arch)), not its name:\n" + "\n".join(found)


def test_the_arch_test_counter_sees_comparisons_keys_literals_and_lists(tmp_path):
    (tmp_path / "m.py").write_text(
        'if arch == "t5" or cfg.model.arch in ("llama", "qwen2"):\n    pass\n'
        'TYPES = {"t5": 1}\nArch = Literal["t5", "gemma2"]\nok = arch in DECODER_ONLY\n'
        'from tagi_ds.config import DECODER_ONLY\nrecipe = {"arch": "t5"}\n'
    )
    found = arch_tests(tmp_path, (".",), but="-")
    assert [int(f.split(":")[1]) for f in found] == [1, 3, 4, 5]  # a line once; the import and a value are not tests


# -- where a run's adapters come from is asked of its source (tagi_ds/stages.py), not re-derived from a name ------
MODE_WORDS = {
    "tagi",
    "concat",
    "no_instruction",
    "teacher",  # stages.MODES' names
    "generated",
    "shared",
    "per_task",
}  # the adapter sources' old Literal values
NOT_MODES = ("input_view", "generator")  # a view name and the hypernet's generator kind share words with modes


def mode_dispatches(
    places: tuple[str, ...] = ("tagi_ds", "launchers"), but: tuple[str, ...] = ("tagi_ds/stages.py",)
) -> list[str]:
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
            if any(words(s) for s in sides) or any(
                isinstance(s, ast.Attribute) and s.attr == "adapters" for s in sides
            ):
                out.append(f"{f.relative_to(REPO) if f.is_relative_to(REPO) else f}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_mode_dispatches_stay_in_stages():
    found = mode_dispatches()
    # 26 before the adapter sources, 16 after them, 1 now: config.py's fusion rule (config sits below stages.py, so it
    # cannot ask a mode row; the rule belongs with the hypernet.fusion field it checks).
    assert len(found) <= 1, "ask the mode's adapter source (tagi_ds.stages), not its name:\n" + "\n".join(found)


def test_the_dispatch_counter_sees_names_and_sources(tmp_path):
    (tmp_path / "m.py").write_text(
        'if m.adapters == "x" or mode in ("tagi", "y") or v == "concat":\n    pass\n'
        'if self.input_view == "concat" or cfg.generator == "shared":\n    pass\n'
    )
    assert len(mode_dispatches((str(tmp_path),), ())) == 3  # each Compare of the first line; views skipped


# -- a run is assembled in one place (tagi_ds/assembly.py), not hand-built by each entry point ------------------
BUILDS = {"build_backbone", "build_engine", "inference_engine"}  # the building blocks (runtime/engine.py, model.py)
ASSEMBLY_PLACES = ("tagi_ds", "launchers", "benchmarks", "scripts")
BLOCKS = ("tagi_ds/assembly.py", "tagi_ds/runtime/engine.py", "tagi_ds/model.py")  # the assembly, the blocks


def run_assemblies(root: Path = REPO, places: tuple[str, ...] = ASSEMBLY_PLACES, but: tuple[str, ...] = BLOCKS):
    """``file:function`` of every function (or module body) outside ``but`` that builds a run by hand: it calls a
    backbone or engine builder (``build_backbone``, ``build_engine``, ``inference_engine``) or
    ``deepspeed.initialize`` itself. On the tree before the assembly (52113b8): 13 in 11 files of tagi_ds/,
    benchmarks/ and scripts/: the issue's five (train/loop.py, eval/evaluate.py twice, export/peft.py,
    plan/measure.py + plan/shapes.py, benchmarks/bench_train_step.py), and runtime/preflight.py's meta model,
    serve/engine.py, diagnose.py, two more benchmarks and scripts/gpu_pipeline.py."""

    def builds(call: ast.Call) -> bool:
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name == "initialize":
            return isinstance(f, ast.Attribute) and ast.unparse(f.value) == "deepspeed"
        return name in BUILDS

    out: set[str] = set()
    for f in (g for place in places for g in sorted((root / place).rglob("*.py"))):
        rel = str(f.relative_to(root))
        if rel in but:
            continue
        tree = ast.parse(f.read_text(encoding="utf-8"))
        outer: dict[ast.AST, str] = {}  # each node -> the outermost function holding it (a closure is its parent's)
        for node in tree.body:
            name = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else "<module>"
            for sub in ast.walk(node):
                outer[sub] = name
        out |= {f"{rel}:{outer[n]}" for n in ast.walk(tree) if isinstance(n, ast.Call) and builds(n)}
    return sorted(out)


def test_a_run_is_assembled_in_one_place():
    found = run_assemblies()
    assert found == [], "build the run with tagi_ds.assembly.assemble, not by hand:\n" + "\n".join(found)


def test_the_assembly_counter_sees_builders_and_deepspeed_initialize(tmp_path):
    (tmp_path / "m.py").write_text(
        "import deepspeed\n\ndef a(cfg):\n    b = E.build_backbone(cfg)\n    return E.build_engine(b)\n\n"
        "def c(m):\n    def inner():\n        return deepspeed.initialize(model=m)\n    return inner\n\n"
        "def d(x):\n    return x.initialize()\n\nmodel = build_backbone(cfg)\n"
    )
    (tmp_path / "blocks.py").write_text("def build_backbone(cfg):\n    return build_backbone(cfg)\n")
    found = run_assemblies(tmp_path, (".",), but=("blocks.py",))
    assert found == ["m.py:<module>", "m.py:a", "m.py:c"]  # a function once, a closure as its own; not x.initialize


if __name__ == "__main__":  # python -m tests.core.test_architecture [TREE]: the count, line by line (TREE: a checkout)
    import sys

    tree = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO
    hits = arch_tests(tree)
    print(
        "\n".join(hits) + f"\n{len(hits)} architecture-name tests outside tagi_ds/backbones/ in "
        f"{', '.join(ARCH_PLACES)}"
    )
    built = run_assemblies(tree)
    print(
        "\n".join(built) + f"\n{len(built)} run assemblies outside tagi_ds/assembly.py in {', '.join(ASSEMBLY_PLACES)}"
    )
