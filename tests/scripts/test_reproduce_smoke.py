"""Smoke of scripts/pretrain_backbone.py (2 steps): the saved dir loads as a tagi-ds backbone + tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from tagi_ds.config import apply_overrides
from tagi_ds.data import SentencePieceTokenizer, builtin_suite, format_concat, load_tokenizer
from tagi_ds.model import build_backbone
from tagi_ds.recipes import get_recipe

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_backbone.py"


def _script():
    spec = importlib.util.spec_from_file_location("pretrain_backbone", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pretrain_backbone_saves_a_loadable_model_and_tokenizer(tmp_path):
    out = tmp_path / "backbone"
    _script().main(["--out", str(out), "--steps", "2", "--batch", "4", "--log_every", "1"])
    assert (out / "config.json").is_file() and not (tmp_path / "backbone.tmp").exists()

    cfg = apply_overrides(get_recipe("mini"), [f"model.model_name_or_path={out}"])
    tok = load_tokenizer(cfg)  # AutoTokenizer on the model dir
    builtin = SentencePieceTokenizer()
    task = builtin_suite(0)["test"][0]
    for text in (format_concat(task, task.instances[0].input, "def_pos"), task.instances[0].outputs[0]):
        assert tok.encode(text) == builtin.encode(text)  # same ids as the built-in tokenizer
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 1024)

    model = build_backbone(cfg, {"pad_id": tok.pad_id, "eos_id": tok.eos_id})
    assert model.config.d_model == get_recipe("mini").model.d_model
    # Deterministic from the seed: a second run gives the same weights.
    _script().main(["--out", str(tmp_path / "again"), "--steps", "2", "--batch", "4", "--log_every", "1"])
    again = build_backbone(apply_overrides(cfg, [f"model.model_name_or_path={tmp_path / 'again'}"]))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_adapted_t5_ffn_output_projection_runs():
    """T5's gated FFN reads ``wo.weight.dtype``: an adapted ``wo`` must expose its base layer's weight."""
    from tagi_ds.adapters import AdapterState
    from tagi_ds.backbones import t5
    from tagi_ds.backbones.base import inject

    cfg = apply_overrides(get_recipe("tiny"), ["model.adapted=q,v,wi_0,wi_1,wo"])
    model = build_backbone(cfg)
    sites = inject(model, t5.site_names(model, cfg.model), AdapterState())
    assert any(s.kind == "wo" for s in sites)
    wo = model.get_submodule(next(s.name for s in sites if s.kind == "wo"))
    assert wo.weight is wo.base_layer.weight
    ids = torch.ones(2, 5, dtype=torch.long)
    assert model(input_ids=ids, decoder_input_ids=ids).logits.shape == (2, 5, cfg.model.vocab_size)


def _report_script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "make_report.py"
    spec = importlib.util.spec_from_file_location("make_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_report_aggregates_seeds(tmp_path, monkeypatch):
    """docs/results.md from a multi-seed run: means, sample sd, per-seed values and the goal verdict."""
    import json
    import sys

    run, docs = tmp_path / "run", tmp_path / "docs"
    scores = {
        "tagi": [10.0, 14.0, 12.0],
        "concat": [12.0, 12.0, 15.0],
        "no_instruction": [5.0, 6.0, 7.0],
        "no_kl": [11.0, 17.0],
    }  # an ablation run on seeds 0 and 1 only (ABLATION_SEEDS)
    flops = {"tagi": 30e6, "concat": 100e6, "no_instruction": 20e6, "no_kl": 31e6}
    for key, per_seed in scores.items():
        for seed, score in enumerate(per_seed):
            d = run / "eval" / f"s{seed}" / key
            d.mkdir(parents=True)
            (d / "results.json").write_text(
                json.dumps(
                    {
                        "rougeL": score,
                        "exact_match": score / 2,
                        "cost": {"flops_per_example": flops[key]},
                        "per_category": {"ordering": {"rougeL": score + 1}},
                    }
                )
            )
    (run / "ft_tagi_s0.done").write_text("100")
    (run / "ft_tagi_s1.done").write_text("120")
    (run / "reproduce.log").write_text("[12:00:00 +0s] skip backbone (done)\n[12:00:00 +0s] start teachers\n")
    mod = _report_script()
    plotted = {}
    monkeypatch.setattr(mod, "plot", lambda rouge, fl, d: plotted.update(rouge))
    monkeypatch.setattr(sys, "argv", ["make_report.py", "--run", str(run), "--docs", str(docs), "--wall_s", "60"])
    mod.main()
    md = (docs / "results.md").read_text()
    assert "| 12.00 ± 2.00 | 10.0 / 14.0 / 12.0 |" in md  # TAGI: mean ± sample sd, then each seed
    assert "| 13.00 ± 1.73 | 12.0 / 12.0 / 15.0 |" in md
    assert "0.30x" in md and "12.00 vs 13.00 ROUGE-L (-1.00 points, mean over 3 seeds (0, 1, 2))" in md
    assert "is met (quality ok, cost ok)" in md  # -1.00 is within 1 point; 0.30x <= 0.4x
    assert (
        "TAGI minus concat: -2.0, +2.0, -3.0 (TAGI ahead in 1 of 3 seeds); paired: mean -1.00, SE 1.53, 95% CI "
        "[-7.57, +5.57]: not resolved (the CI includes 0)." in md
    )  # t(2) = 4.303; no per_task: no bootstrap
    assert "| ordering | 7.0 | 14.0 | 13.0 | 15.0 |" in md  # per-category means, methods in table order
    assert "| 14.00 ± 4.24 | 11.0 / 17.0 (seeds 0, 1) |" in md
    assert "TAGI w/o KL: +2.00 ± 1.41 over 2 seeds ROUGE-L vs full TAGI" in md  # paired on the shared seeds only
    assert "paired: mean +2.00, SE 1.00, 95% CI [-10.71, +14.71]: not resolved" in md  # t(1) = 12.706
    assert "(TAGI w/o KL: seeds 0, 1 only, to keep the pipeline within 45 minutes)" in md
    assert "ft_tagi 110" in md  # per-seed stage times averaged
    assert "1.0 min (stages reused from an earlier run, not included: backbone)" in md
    assert plotted == scores and not (docs / "results.md.tmp").exists()


def test_make_report_lists_each_invocation_of_a_resumed_pipeline(tmp_path):
    """A pipeline re-run with REDO_EVAL=1 (evaluations only): the report gives both wall times and what each ran,
    never the short re-run's time as the pipeline's."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "reproduce.log").write_text(
        "[15:00:00 +0s] reproduce: OUT=run SCALE=1 SEEDS='0'\n"
        "[15:00:00 +0s] start backbone\n[15:10:00 +600s] done  backbone (600s)\n"
        "[15:10:00 +600s] start ft_tagi_s0\n[15:20:00 +1200s] start ev_tagi_s0\n"
        "[15:40:00 +2334s] pipeline wall time 2334s\n"
        "[17:00:00 +0s] reproduce: OUT=run SCALE=1 SEEDS='0'\n"
        "[17:00:00 +0s] REDO_EVAL=1: every evaluation re-runs\n"
        "[17:00:00 +0s] skip backbone (done)\n[17:00:00 +0s] skip ft_tagi_s0 (done)\n"
        "[17:00:00 +0s] start ev_tagi_s0\n" + "".join(f"[17:00:01 +1s] start ev_x_s{i}\n" for i in range(6))
    )
    mod = _report_script()
    lines = mod.wall_lines(run, 185.0)  # the second invocation's time, passed by reproduce.sh
    assert lines[0].startswith("- The pipeline ran in 2 invocations")
    assert lines[1] == "  1. 38.9 min: ran 3 stage(s) (backbone, ft_tagi_s0, ev_tagi_s0); reused 0 stage(s)"
    assert lines[2] == (
        "  2. 3.1 min with REDO_EVAL=1 (every evaluation re-run with the code of the commit above): "
        "ran 7 stages (7 evaluation); reused 2 stage(s) (backbone, ft_tagi_s0)"
    )
    single = tmp_path / "single"
    single.mkdir()
    (single / "reproduce.log").write_text("[15:00:00 +0s] reproduce: OUT=run\n[15:00:00 +0s] skip backbone (done)\n")
    assert mod.wall_lines(single, 60.0) == [
        "- Whole pipeline (`bash scripts/reproduce.sh`, training + evaluation): 1.0 min "
        "(stages reused from an earlier run, not included: backbone)"
    ]


def test_paired_intervals_claim_an_ordering_only_where_the_ci_excludes_zero():
    mod = _report_script()
    m, se, lo, hi = mod.paired_ci([1.0, 2.0, 3.0, 2.0, 2.0])  # sd 0.707, t(4) = 2.776
    assert (m, round(se, 4), round(lo, 3), round(hi, 3)) == (2.0, 0.3162, 1.122, 2.878)
    assert mod.paired_ci([1.0]) is None and mod.t975(40) == 1.96 and mod.t975(11) == mod.T975[10]
    assert mod.verdict((m, se, lo, hi), None, "TAGI", "Concat").endswith(": resolved, TAGI above Concat")
    assert mod.verdict(mod.paired_ci([-1.0, -2.0, -1.5]), None, "w/o KL", "TAGI").endswith("w/o KL below TAGI")
    assert mod.verdict(None, None, "a", "b") == "one seed: no interval, no claim"
    # The seed x task bootstrap: an effect carried by one task of four is not resolved by it, even though every
    # seed shows it; a uniform effect is. Deterministic (its own seeded RNG).
    one_task = {s: {"t1": 8.0, "t2": 0.0, "t3": 0.0, "t4": 0.0} for s in range(5)}
    lo, hi = mod.bootstrap_ci(one_task)
    assert lo <= 0.0 < hi and (lo, hi) == mod.bootstrap_ci(one_task)
    uniform = {s: {f"t{i}": 2.0 + 0.1 * s for i in range(4)} for s in range(5)}
    lo, hi = mod.bootstrap_ci(uniform)
    assert 2.0 <= lo <= hi <= 2.4
    assert mod.bootstrap_ci({0: {"t1": 1.0, "t2": 1.0}}) is None  # one seed


def _dry_run(tmp_path, **env) -> list[str]:
    """scripts/reproduce.sh with DRY=1: the stage commands it would run, in order, nothing run."""
    import os
    import subprocess
    import sys

    out = tmp_path / "dry"
    script = Path(__file__).resolve().parents[2] / "scripts" / "reproduce.sh"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    subprocess.run(
        ["bash", str(script)], env={**os.environ, "PATH": path, "DRY": "1", "OUT": str(out), **env}, check=True,
        capture_output=True, timeout=300,
    )  # fmt: skip
    return (out / "commands.dry.txt").read_text().splitlines()


def test_reproduce_runs_the_gates_before_the_seed_budget(tmp_path):
    """Suite v2 (the default): per-task teachers; seed 0's TAGI / concat / no-instruction, their dev evaluations,
    the swap diagnosis and the seen-task evaluations come before scripts/gates.py, and every other finetuning
    after it; each command is listed once."""
    cmds = _dry_run(tmp_path, SEEDS="0 1")
    teachers = next(c for c in cmds if "train_teachers.py" in c)
    assert "teacher.granularity=task" in teachers and "data.builtin_suite=v2" in teachers
    gate = cmds.index(next(c for c in cmds if "scripts/gates.py" in c))
    assert "--policy stop" in cmds[gate]
    before, after = cmds[:gate], cmds[gate + 1 :]
    for name in ("s0/ft_tagi ", "s0/ft_concat ", "s0/ft_no_instruction ", "eval/dev/concat", "eval/dev/diagnose"):
        assert any(name in c for c in before), name
    assert any("eval/seen/teachers" in c for c in before) and any("--split dev" in c for c in before)
    assert not any("finetune.py" in c for c in after if "/s0/ft_tagi " in c or "/s0/ft_concat " in c)
    assert any("s0/ft_no_kl" in c for c in after) and any("s1/ft_tagi " in c for c in after)
    assert len(cmds) == len(set(cmds))
    assert not any("param_align=delta" in c for c in cmds)  # v2 aligns with the relative term (the default)


def test_reproduce_keeps_the_old_suite_reproducible(tmp_path):
    """SUITE=v1: the settings its numbers were measured with (per-category teachers, param_align=delta), no gates."""
    cmds = _dry_run(tmp_path, SUITE="v1", SEEDS="0")
    assert "teacher.granularity=category" in next(c for c in cmds if "train_teachers.py" in c)
    assert not any("gates.py" in c or "--split dev" in c for c in cmds)
    assert all("param_align=delta" in c for c in cmds if "ft_tagi " in c)
    assert all("data.builtin_suite=v1" in c for c in cmds if "finetune.py" in c or "evaluate.py" in c)


def test_make_report_includes_the_gates(tmp_path, monkeypatch):
    import json
    import sys

    run, docs = tmp_path / "run", tmp_path / "docs"
    run.mkdir()
    gates = [
        {"name": "instruction", "value": 16.0, "passed": True, "detail": "dev EM concat 30.0 - ...", "means": "x"},
        {"name": "swap", "value": 2.0, "passed": False, "detail": "dev EM lost ... +2.0", "means": "it ignores it"},
    ]
    (run / "gates.json").write_text(json.dumps({"policy": "warn", "passed": False, "gates": gates}))
    mod = _report_script()
    monkeypatch.setattr(mod, "plot", lambda *a: None)
    monkeypatch.setattr(sys, "argv", ["make_report.py", "--run", str(run), "--docs", str(docs)])
    mod.main()
    md = (docs / "results.md").read_text()
    assert "| swap | **FAIL** | dev EM lost ... +2.0 |" in md and "| instruction | pass |" in md
    assert "1 gate(s) failed; the seeds ran anyway (GATES=warn)" in md and "- swap: it ignores it." in md


def test_reproduce_with_a_teacher_model(tmp_path):
    """TEACHER_MODEL=1: a concat run merged into the backbone (scripts/merge_lora.py) before any TAGI run; the arms
    with KL read it (w/o param-MSE without the bank, which --teacher_model refuses as unused), w/o KL only the
    bank; the teacher gate reads the teacher model's seen-task evaluation and training run."""
    cmds = _dry_run(tmp_path, SEEDS="0", TEACHER_MODEL="1")
    merge = cmds.index(next(c for c in cmds if "merge_lora.py" in c))
    first_tagi = cmds.index(next(c for c in cmds if "/s0/ft_tagi " in c))
    assert "--mode concat" in cmds[merge - 1] and "teacher_model_run" in cmds[merge - 1] and merge < first_tagi
    arm = {k: next(c for c in cmds if f"/s0/ft_{k} " in c) for k in ("tagi", "no_kl", "no_param", "no_fusion")}
    tm = f"--teacher_model {tmp_path / 'dry' / 'teacher_model'}"
    assert tm in arm["tagi"] and "--teachers" in arm["tagi"] and tm in arm["no_fusion"]
    assert tm not in arm["no_kl"] and "--teachers" in arm["no_kl"]
    assert tm in arm["no_param"] and "--teachers" not in arm["no_param"]
    gate = next(c for c in cmds if "gates.py" in c)
    assert "--teacher_eval" in gate and "eval/seen/teacher_model" in gate
    assert any("--mode concat --model_name_or_path" in c and "eval/seen/teacher_model" in c for c in cmds)
