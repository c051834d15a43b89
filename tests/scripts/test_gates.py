"""scripts/gates.py: each gate's threshold on synthetic values, and the gates read from a synthetic run directory
(paths as scripts/reproduce.sh writes them). Pure python, no training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gates.py"


@pytest.fixture(scope="module")
def g():
    spec = importlib.util.spec_from_file_location("gates", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gates"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_instruction_gate_needs_five_em(g):
    assert g.instruction_gate(20.0, 15.0).passed  # exactly 5
    assert not g.instruction_gate(19.9, 15.0).passed
    assert g.instruction_gate(20.0, 15.0).value == pytest.approx(5.0)
    missing = g.instruction_gate(None, 15.0)
    assert not missing.passed and missing.value is None and "not measured" in missing.detail


def test_teacher_gate_needs_both_em_lead_and_ce_ratio(g):
    assert g.teacher_gate(40.0, 30.0, 0.8, 1.0).passed
    assert not g.teacher_gate(39.0, 30.0, 0.5, 1.0).passed  # EM lead 9
    assert not g.teacher_gate(60.0, 30.0, 0.81, 1.0).passed  # CE 0.81x
    # The measurement of the per-category teachers: no better than the student.
    gate = g.teacher_gate(31.1, 33.6, 1.25, 1.26)
    assert not gate.passed and gate.value["em_lead"] == pytest.approx(-2.5) and "distillation" in gate.means
    assert not g.teacher_gate(40.0, None, 0.5, 1.0).passed


def test_terms_gate_band(g):
    assert g.terms_gate({"kl": 0.05, "param": 2.0}).passed  # both edges inside
    inert = g.terms_gate({"kl": 0.6, "param": 0.0005})  # the old delta-MSE alignment (issue 25)
    assert not inert.passed and "outside: param" in inert.detail
    assert not g.terms_gate({"kl": 2.5}).passed
    assert not g.terms_gate({}).passed and not g.terms_gate(None).passed


def test_swap_gate(g):
    assert g.swap_gate(13.6).passed and not g.swap_gate(9.9).passed and not g.swap_gate(None).passed


def _write(path: Path, obj) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(obj))


def _metrics(path: Path, records: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def synthetic_run(run: Path, swap: float = 14.0, param_ratio: float = 0.3) -> Path:
    _write(run / "eval" / "dev" / "concat", {"exact_match": 30.0})
    _write(run / "eval" / "dev" / "no_instruction", {"exact_match": 14.0})
    _write(run / "eval" / "seen" / "teachers", {"exact_match": 60.0})
    _write(run / "eval" / "seen" / "tagi", {"exact_match": 40.0})
    _metrics(run / "teachers", [{"step": i, "loss": 9.0, "ce": 0.5} for i in range(1, 30)])
    # The step-0 ratios are on the first record; a later measurement (step 500) must not be read.
    tagi = [{"step": 1, "loss": 3.0, "ce": 2.0, "grad_ratio/kl": 0.4, "grad_ratio/param": param_ratio}]
    tagi += [{"step": i, "loss": 3.0, "ce": 1.0} for i in range(2, 30)]
    tagi += [{"step": 30, "loss": 3.0, "ce": 1.0, "grad_ratio/kl": 5.0, "grad_ratio/param": 5.0}]
    _metrics(run / "s0" / "ft_tagi", tagi)
    d = run / "eval" / "dev" / "diagnose"
    d.mkdir(parents=True)
    (d / "diagnose.json").write_text(json.dumps({"swap_cost_em": {"wrong_both": swap, "wrong_adapter": 1.0}}))
    return run


def test_gates_read_from_a_run_directory(g, tmp_path):
    run = synthetic_run(tmp_path / "run")
    got = {x.name: x for x in g.gates(run)}
    assert all(x.passed for x in got.values()), [x.detail for x in got.values()]
    assert got["instruction"].value == pytest.approx(16.0)
    assert got["teacher"].value == {"em_lead": pytest.approx(20.0), "ce_ratio": pytest.approx(0.5)}  # last 20 CEs
    assert got["terms"].value == {"kl": 0.4, "param": 0.3}  # step 0's, not step 30's
    assert got["swap"].value == pytest.approx(14.0)


def test_failed_gate_stops_or_warns_and_writes_gates_json(g, tmp_path, capsys):
    run = synthetic_run(tmp_path / "run", swap=2.0, param_ratio=0.001)
    assert g.main(["--run", str(run), "--policy", "stop"]) == 1
    out = capsys.readouterr().out
    assert "gate swap        FAIL" in out and "stopping before the seed budget" in out
    assert "failing it means: the hypernetwork ignores its instruction" in out
    saved = json.loads((run / "gates.json").read_text())
    assert saved["passed"] is False and saved["policy"] == "stop"
    assert [x["name"] for x in saved["gates"] if not x["passed"]] == ["terms", "swap"]
    assert g.main(["--run", str(run), "--policy", "warn"]) == 0
    assert "WARNING: gate(s) terms, swap FAILED" in capsys.readouterr().out
    assert g.main(["--run", str(synthetic_run(tmp_path / "ok"))]) == 0


def test_missing_inputs_fail_as_not_measured(g, tmp_path):
    results = g.gates(tmp_path)
    assert [x.passed for x in results] == [False] * 4 and all("not measured" in x.detail for x in results)
