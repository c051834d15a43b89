"""An entry point added as docs/architecture.md says to add one, from this test file alone.

The throwaway entry point (written into the test's temp dir, run as a user runs a launcher) counts the parameters
of a stage's model: it parses with ``runtime.flags.Parser``, runs under ``runtime.preflight.guarded``, checks every
input before writing (``check_output_dir``, ``deepspeed_config``, ``stages.spec``), freezes the config, starts with
``rundir.start(rundir.RunStart.of(...))`` and builds the model with ``assembly.assemble``. Seen: its output and
``config.json`` (the run's stage, config and command), one ``error:`` line and exit 2 for a bad flag or a bad
stage with nothing written, and the run directory's lock refusing a second run while the first holds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

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
        if Path(out, "hold").exists():  # the test's second run: started while this one holds the lock
            import time

            Path(out, "holding").touch()
            while Path(out, "hold").exists():
                time.sleep(0.1)


    if __name__ == "__main__":
        preflight.guarded(main)
    '''
)


def run(script, *args, timeout=HANG_S):
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout
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
    # a smaller hypernetwork, counted by the same entry point: the count follows the config
    proc = run(script, "--output_dir", str(tmp_path / "rank2"), "--set", "hypernet.rank=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "rank2" / "count.json").read_text())["trainable"] < count["trainable"]


def test_its_bad_input_is_one_line_and_nothing_written(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(ENTRY_POINT)
    for args, message in [
        (["--output_dir", str(tmp_path / "a"), "--stage", "warmup"], "warmup"),
        (["--output_dir", str(tmp_path / "b"), "--set", "hypernet.rank=0"], "hypernet.rank"),
        (["--output_dir", str(tmp_path / "c"), "--frobnicate"], "--frobnicate"),
    ]:
        proc = run(script, *args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        assert not (tmp_path / args[1].rsplit("/", 1)[1]).exists()


def test_its_run_directory_is_locked_while_it_runs(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(ENTRY_POINT)
    out = tmp_path / "run"
    out.mkdir()
    (out / "hold").touch()
    first = subprocess.Popen(
        [sys.executable, str(script), "--output_dir", str(out)], cwd=REPO, env=env(), stderr=subprocess.PIPE, text=True
    )
    try:
        # waits on the event itself (the first run says it holds the lock), bounded only as a hang guard
        import time

        deadline = time.monotonic() + HANG_S
        while not (out / "holding").exists():
            assert first.poll() is None, first.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the first run never reached its hold"
            time.sleep(0.2)
        second = run(script, "--output_dir", str(out))
        assert second.returncode == 2 and "another run is using it" in second.stderr, second.stderr[-2000:]
    finally:
        (out / "hold").unlink()
        first.wait(timeout=HANG_S)
    assert first.returncode == 0
