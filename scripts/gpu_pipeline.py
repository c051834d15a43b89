#!/usr/bin/env python
"""The whole pipeline on one device under DeepSpeed ZeRO-3, each stage checked (``gpu_session.sh check``).

    train_teachers -> pretrain -> finetune (KL + param terms) -> finetune --mode concat
      -> evaluate tagi, evaluate concat (+ the results table) -> generate_adapter -> the adapter loaded in peft

Every stage runs as a user runs it on one device (``python launchers/STAGE.py``: a world of one, under the DeepSpeed
engine of the recipe's ZeRO-3 config) on the built-in suite with the tiny recipe. On a GPU: bf16
(``train.precision=auto``) and the Triton adapter op forced (``model.adapter_impl=triton``: a silent fallback to the
torch reference would hide the kernel); on a CPU (the test suite's SMOKE run): fp32 and the torch op. Independent
stages run at once, two by two (teachers and pretrain, finetune and concat, the two evaluations): most of a tiny
stage's time is start-up. Checks: exit 0, every logged loss term finite, the precision that ran, both evaluations'
results and the table, and the PEFT adapter loaded onto the backbone on the device with finite logits. One line per
stage goes to OUT/pipeline.tsv; exit 1 if any check failed.

    python scripts/gpu_pipeline.py --out /tmp/pipe [--steps 6] [--eval_n 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teachers", "pretrain", "finetune", "concat", "eval_tagi", "eval_concat", "table", "adapter")


class Pipeline:
    def __init__(self, out: Path, steps: int, eval_n: int, timeout: int, eval_set: list[str]) -> None:
        import torch

        self.out, self.steps, self.eval_n, self.timeout, self.eval_set = out, steps, eval_n, timeout, eval_set
        self.cuda = torch.cuda.is_available()
        self.impl = "triton" if self.cuda else "torch"
        self.rows: list[tuple[str, str, float, str]] = []
        out.mkdir(parents=True, exist_ok=True)

    def launch(self, name: str, script: str, *args: str) -> bool:
        ok, row = self._launch(name, script, *args)
        self.rows.append(row)
        return ok

    def _launch(self, name: str, script: str, *args: str) -> tuple[bool, tuple[str, str, float, str]]:
        cmd = [sys.executable, str(ROOT / "launchers" / script), *args, "--set", f"model.adapter_impl={self.impl}"]
        t0 = time.perf_counter()
        log = self.out / f"{name}.log"
        with log.open("w") as f:
            f.write("+ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=self.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = 124
        secs = time.perf_counter() - t0
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            return False, (name, "FAIL", secs, f"exit {rc}: {tail[0][:160]}")
        return True, (name, "ok", secs, "")

    def _set(self, name: str, status: str, detail: str) -> None:
        secs = self.rows.pop()[2] if self.rows and self.rows[-1][0] == name else 0.0
        self.rows.append((name, status, secs, detail))

    def fail(self, name: str, why: str) -> None:
        self._set(name, "FAIL", why)

    def ok(self, name: str, detail: str) -> None:
        self._set(name, "ok", detail)

    def check_train(self, name: str, run: Path, terms: tuple[str, ...] = ("loss",)) -> None:
        """Every logged term finite, the last step reached, and the precision the device should run."""
        try:
            metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            precision = json.loads((run / "config.json").read_text())["precision"]
        except (OSError, ValueError, KeyError) as err:
            return self.fail(name, f"unreadable run dir: {err}")
        bad = [(m["step"], t, m.get(t)) for m in metrics for t in terms if not _finite(m.get(t))]
        want = "bf16" if self.cuda else "fp32"
        if not metrics or metrics[-1]["step"] != self.steps:
            return self.fail(name, f"last logged step {metrics[-1]['step'] if metrics else None} != {self.steps}")
        if bad:
            return self.fail(name, f"non-finite {bad[0][1]} at step {bad[0][0]}: {bad[0][2]}")
        if precision != want:
            return self.fail(name, f"precision {precision}, expected {want}")
        last = metrics[-1]
        self.ok(
            name, f"{precision}, {self.impl} op; step {last['step']}: " + ", ".join(f"{t} {last[t]:.4g}" for t in terms)
        )

    def wave(self, *jobs) -> None:
        """Launch independent stages at once (each its own process and DeepSpeed world of one; most of a tiny
        stage's time is Python start-up and imports), then check each in order. ``jobs``: (name, script, args,
        check)."""
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(lambda j: self._launch(j[0], j[1], *j[2]), jobs))
        for (*_, check), (ok, row) in zip(jobs, done):
            self.rows.append(row)
            if ok:
                check()

    def run(self) -> bool:
        o = self.out
        train = ["--max_steps", str(self.steps), "--save_steps", str(self.steps)]
        # FLOPs by formula, as on a GPU (the CPU default, torch's FLOP counter, is the slow part of a tiny evaluation).
        ev = [
            "--max_new_tokens",
            "16",
            "--flops",
            "formula",
            "--set",
            f"data.max_instances_per_task={self.eval_n}",
            *self.eval_set,
        ]
        self.wave(
            (
                "teachers",
                "train_teachers.py",
                [*train, "--output_dir", str(o / "teachers")],
                lambda: self.check_train("teachers", o / "teachers"),
            ),
            (
                "pretrain",
                "pretrain.py",
                [*train, "--output_dir", str(o / "pretrain")],
                lambda: self.check_train("pretrain", o / "pretrain"),
            ),
        )
        self.wave(
            (
                "finetune",
                "finetune.py",
                [
                    *train,
                    "--output_dir",
                    str(o / "finetune"),
                    "--teachers",
                    str(o / "teachers" / "teachers"),
                    "--init_hypernet",
                    str(o / "pretrain" / "hypernet"),
                ],
                lambda: self.check_train("finetune", o / "finetune", ("loss", "ce", "kl", "param")),
            ),
            (
                "concat",
                "finetune.py",
                [*train, "--mode", "concat", "--output_dir", str(o / "concat")],
                lambda: self.check_train("concat", o / "concat"),
            ),
        )
        self.wave(
            *[
                (
                    name,
                    "evaluate.py",
                    [*ev, *src, "--output_dir", str(o / name)],
                    lambda name=name: self.check_eval(name, o / name),
                )
                for name, src in (
                    ("eval_tagi", ["--hypernet", str(o / "finetune" / "hypernet")]),
                    ("eval_concat", ["--adapter", str(o / "concat" / "baseline_lora")]),
                )
            ]
        )
        self.table()
        if self.launch(
            "adapter",
            "generate_adapter.py",
            "--hypernet",
            str(o / "finetune" / "hypernet"),
            "--instruction",
            "Reverse the order of the words.",
            "--output_dir",
            str(o / "adapter"),
        ):
            self.check_peft(o / "adapter", o / "finetune" / "hypernet")
        return self.report()

    def check_eval(self, name: str, run: Path) -> None:
        try:
            r = json.loads((run / "results.json").read_text())
        except (OSError, ValueError) as err:
            return self.fail(name, f"no results.json: {err}")
        if not (r.get("num_examples", 0) > 0 and _finite(r.get("rougeL"))):
            return self.fail(name, f"results.json without examples or ROUGE-L: {r.get('num_examples')}")
        self.ok(name, f"{r['num_examples']} examples, ROUGE-L {r['rougeL']:.1f}")

    def table(self) -> None:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tagi_ds.eval.table",
                f"concat={self.out / 'eval_concat'}",
                f"tagi={self.out / 'eval_tagi'}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "120"},
        )
        (self.out / "table.txt").write_text(proc.stdout + proc.stderr)
        ok = proc.returncode == 0 and "held-out tasks" in proc.stdout
        self.rows.append(
            (
                "table",
                "ok" if ok else "FAIL",
                time.perf_counter() - t0,
                "table.txt" if ok else (proc.stderr.strip()[-160:] or f"exit {proc.returncode}"),
            )
        )

    def check_peft(self, adapter: Path, hypernet: Path) -> None:
        """The exported adapter loaded with peft onto the backbone it was generated for, on the device."""
        import peft
        import torch

        from tagi_ds import artifacts, families
        from tagi_ds.assembly import plain_backbone

        try:
            cfg = artifacts.read_config(hypernet)
            device = torch.device("cuda" if self.cuda else "cpu")
            model = peft.PeftModel.from_pretrained(plain_backbone(cfg), str(adapter)).to(device).eval()
            ids = torch.tensor([[5, 6, 7, 8, 1]], device=device)
            with torch.no_grad():
                kw = {"decoder_input_ids": ids[:, :2]} if families.get(cfg.model.arch).encoder_decoder else {}
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw).logits
            loras = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
        except Exception as err:  # noqa: BLE001  (reported as the check's result, with its type)
            return self.fail("adapter", f"peft load: {type(err).__name__}: {err}"[:200])
        finite = bool(torch.isfinite(logits).all())
        if not finite or loras == 0:
            return self.fail("adapter", f"peft: {loras} LoRA modules, finite logits: {finite}")
        self.ok("adapter", f"peft {peft.__version__}: {loras} LoRA modules on {logits.device}, finite logits")

    def report(self) -> bool:
        lines = [f"{n}\t{s}\t{t:.1f}\t{d}" for n, s, t, d in self.rows]
        (self.out / "pipeline.tsv").write_text("stage\tstatus\tseconds\tdetail\n" + "\n".join(lines) + "\n")
        width = max(len(n) for n, *_ in self.rows)
        print(f"{'stage':<{width}}  status  seconds  detail")
        for n, s, t, d in self.rows:
            print(f"{n:<{width}}  {s:<6}  {t:7.1f}  {d}")
        return [n for n, s, _, _ in self.rows if s == "ok"] == list(STAGES)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where the run dirs, logs and pipeline.tsv go")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per training stage (default 6)")
    ap.add_argument("--eval_n", type=int, default=5, help="instances per held-out task evaluated (default 5)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per stage (default 240)")
    ap.add_argument(
        "--eval_set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both evaluations, e.g. data.categories=Ordering",
    )
    args = ap.parse_args(argv)
    return 0 if Pipeline(args.out, args.steps, args.eval_n, args.timeout, args.eval_set).run() else 1


if __name__ == "__main__":
    sys.exit(main())
