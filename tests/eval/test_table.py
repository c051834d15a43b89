"""``python -m tagi_ds.eval.table``: every run label and number printed whole, whatever the console's width."""

import json

import pytest

from tagi_ds.eval import table


def _results(path, rouge, flops):
    path.mkdir()
    (path / "results.json").write_text(
        json.dumps(
            {"rougeL": rouge, "exact_match": 1.0, "num_examples": 580, "cost": {"flops": flops, "wall_s": 123.4}}
        )
    )
    return path


@pytest.mark.parametrize("columns", ["40", "80", "200"])
def test_labels_and_numbers_are_never_cut(tmp_path, monkeypatch, capsys, columns):
    # 80: what rich assumes for a pipe (the quickstart's output in a log); 40: a narrow terminal.
    monkeypatch.setenv("COLUMNS", columns)
    runs = {"concat": (12.345, 1.23e12), "tagi": (23.456, 4.56e11), "no_instruction": (3.21, 9.87e11)}
    table.main([f"{name}={_results(tmp_path / name, *v)}" for name, v in runs.items()])
    out = capsys.readouterr().out
    assert "\u2026" not in out  # rich's ellipsis: something was cut
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("\u2502")}
    assert set(rows) == set(runs)
    assert rows["no_instruction"][3:6] == ["3.2", "\u2502", "1.0"]
    assert rows["tagi"][9] == "456.00" and rows["tagi"][11] == "0.37x"  # GFLOPs, FLOPs / concat
    for header in ("ROUGE-L", "exact match", "FLOPs / concat", "wall s"):
        assert header in out
