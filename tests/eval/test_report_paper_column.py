"""scripts/make_report.py compares each ablation with the paper's column of the setting the run used (issue 25
item 6): a Def+2Pos run with -0.7/-2.4/-1.1/-15.7, a Def run with -1.3/-2.7/-0.9/-13.3."""

import json

import pytest

from tests.scripts.test_reproduce_smoke import _report_script


@pytest.mark.parametrize(
    "setting, expected",
    [
        (
            "def_pos",
            {
                "TAGI w/o KL": "Def+2Pos: -2.4",
                "TAGI w/o fusion": "Def+2Pos: -15.7",
                "TAGI w/o pretraining": "Def+2Pos: -0.7",
                "TAGI w/o param-MSE": "Def+2Pos: -1.1",
            },
        ),
        ("def", {"TAGI w/o KL": "Def: -2.7", "TAGI w/o fusion": "Def: -13.3"}),
    ],
)
def test_ablations_are_compared_with_the_papers_column_of_the_run_setting(tmp_path, setting, expected):
    mod = _report_script()
    run = tmp_path / "run"
    for key in ("tagi", "concat", "no_instruction", "no_kl", "no_fusion", "no_pretrain", "no_param"):
        d = run / "eval" / "s0" / key
        d.mkdir(parents=True)
        (d / "results.json").write_text(
            json.dumps({"rougeL": 10.0, "exact_match": 5.0, "cost": {"flops_per_example": 1e6}, "per_category": {}})
        )
    cfg = run / "s0" / "ft_tagi"
    cfg.mkdir(parents=True)
    (cfg / "config.json").write_text(json.dumps({"tagi": {"data": {"setting": setting}}}))
    text = "\n".join(mod.findings(mod.Results(run)))
    for label, paper in expected.items():
        line = next(x for x in text.splitlines() if x.startswith(f"- {label}:"))
        assert f"(paper, XL, {paper})" in line, line
