"""An entry point added as docs/architecture.md says to add one, from this test file alone.

The throwaway entry point (written into the test's temp dir, run as a user runs a launcher) counts the parameters
of a stage's model: it parses with ``runtime.flags.Parser``, runs under ``runtime.preflight.guarded``, checks every
input before writing (``check_output_dir``, ``deepspeed_config``, ``stages.spec``), freezes the config, starts with
``rundir.start(rundir.RunStart.of(...))`` and builds the model with ``assembly.assemble``. Seen: its output and
``config.json`` (the run's stage, config and command), one ``error:`` line and exit 2 for a bad flag, stage or value
with nothing written, and the run directory's lock refusing it while another run holds it.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import textwrap

import pytest

from tagi_ds.runtime import rundir
from tests.train.harness import HANG_S, REPO, env

ENTRY_POINT = textwrap.dedent(
    '''
    """count.py: the trainable and frozen parameters of a stage's model (tiny recipe)."""
    import json
    from pathlib import Path

    from tagi_ds import assembly, data, stages
    from tagi_ds.config import apply_overrides, frozen
    from tagi_ds.files import atomic_write
    from tagi_ds.recipes import get_recipe
    from tagi_ds.runtime import preflight, rundir
    from tagi_ds.runtime.flags import Parser, add_set_flag


    def main():
        p = Parser("count.py", description=__doc__)
        p.add_argument("--stage", default="pretrain", help="the stage whose model is counted")
        p.add_argument("--output_dir", required=True, metavar="DIR")
        add_set_flag(p)
        args = p.parse_args()
        cfg = apply_overrides(get_recipe("tiny"), args.overrides)  # a bad key or value: one line naming it
        cfg.validate()  # every field's rule and the rules across fields
        out = preflight.check_output_dir(args.output_dir)
        ds = preflight.deepspeed_config(None, cfg, 1)
        tok = data.load_tokenizer(cfg)
        spec = stages.spec(args.stage, cfg)  # refuses an unknown stage in one line
        cfg = frozen(cfg)
        out = rundir.start(rundir.RunStart.of(cfg, ds, args))  # process group, seed, lock, config.json
        run = assembly.assemble(spec, cfg, ds, tok.special_ids, runner="none", teacher=False)
        params = list(run.model.parameters())
        count = {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "frozen": sum(getattr(p, "ds_numel", p.numel()) for p in params if not p.requires_grad),
            "device": str(run.device),
        }
        atomic_write(Path(out) / "count.json", json.dumps(count))


    if __name__ == "__main__":
        preflight.guarded(main)
    '''
)


def run(script, *args):
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=HANG_S
    )


def test_an_entry_point_built_from_the_documented_parts(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(ENTRY_POINT)
    out = tmp_path / "run"
    proc = run(script, "--stage", "pretrain", "--output_dir", str(out), "--set", "hypernet.rank=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = json.loads((out / "count.json").read_text())
    assert count["trainable"] > 0 and count["frozen"] > 0 and count["device"] == "cpu"
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["tagi"]["hypernet"]["rank"] == 4
    assert config["args"]["output_dir"] == str(out) and config["world_size"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([rundir.LOCK, "config.json", "count.json"])


def test_its_bad_input_is_one_line_and_nothing_written(tmp_path, monkeypatch, capsys):
    """In this process (each case fails before the run starts, so no process group is joined here)."""
    script = tmp_path / "count.py"
    script.write_text(ENTRY_POINT)
    for name, args, message in [
        ("a", ["--stage", "warmup"], "warmup"),
        ("b", ["--set", "hypernet.rank=0"], "hypernet.rank"),
        ("c", ["--frobnicate"], "--frobnicate"),
    ]:
        monkeypatch.setattr(sys, "argv", [str(script), "--output_dir", str(tmp_path / name), *args])
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(script), run_name="__main__")
        assert stop.value.code == 2, (args, stop.value.code)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], lines
        assert not (tmp_path / name).exists()


def test_its_run_directory_is_locked_while_another_run_holds_it(tmp_path):
    """The lock its start takes: held here (as a first run's rank 0 holds it), the entry point is refused."""
    script = tmp_path / "count.py"
    script.write_text(ENTRY_POINT)
    out = tmp_path / "run"
    out.mkdir()
    rundir.lock(out)
    try:
        proc = run(script, "--output_dir", str(out))
    finally:
        rundir.unlock(out)
    assert proc.returncode == 2 and "another run is using it" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [rundir.LOCK]  # no config.json, no count.json
