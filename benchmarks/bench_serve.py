"""Serving throughput: TAGI-served vs concat-served, at 1, 8 and 32 distinct instructions.

Both variants are ``python -m tagi_ds.serve`` processes over the same backbone with the same batching flags:
  tagi    --mode tagi: each instruction's adapter is generated once (the first request that names it pays the
          hypernetwork), cached, and every request's backbone reads its input alone
  concat  --mode concat: no adapters; the backbone reads the instruction prepended to every input (Tk-Instruct)
A point sends ``--requests`` /v1/completions requests from ``--clients`` concurrent clients (closed loop), the
instructions taken round-robin from D fresh distinct ones of ``--instr_len`` tokens, inputs of ``--input_len``
tokens, ``--output_len`` generated tokens each (``ignore_eos``). Reported: requests/s, generated tokens/s, latency
p50 / p99 (request sent -> answer read, HTTP included), and the adapters tagi generated. Then, one request at a
time, the first-token latency (a ``max_tokens=1`` request: prefill + one token, HTTP included; the median of
``--ttft_reps``): tagi with an unseen instruction (the hypernetwork runs first) and with a cached one, concat.
The hypernetwork is a random generator of the recipe's shape (cost does not depend on its values); the backbone is
the recipe's random init (its shape is what costs).

    python benchmarks/bench_serve.py                        # CPU: tiny; GPU: t5-xl llama-7b
    python benchmarks/bench_serve.py --smoke --out_dir /tmp/r
Results, rewritten after every point: <out_dir>/<device-slug>_<YYYY-MM-DD>_serve[_<tag>].{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from tagi_ds.config import apply_overrides  # noqa: E402
from tagi_ds.recipes import get_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GPU_SERVE_RECIPES = ["t5-xl", "llama-7b"]
WORDS = (
    "apple river stone green quick table window seven bright music horse paper silver garden cloud tiger "
    "yellow bread candle mirror ocean pencil rabbit summer winter orange planet forest castle engine"
).split()
START_S = 1800  # hang guard for a server to come up (a 7B random init on the host takes minutes)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_recipe_args(p, "tiny recipe, 1 and 2 distinct instructions, 8 requests, 64-token instructions")
    p.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 32], help="distinct instructions per point")
    p.add_argument("--requests", type=int, default=None, help="requests per point (default: GPU 256, CPU 64)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--instr_len", type=int, default=256, help="instruction tokens")
    p.add_argument("--input_len", type=int, default=32, help="input tokens")
    p.add_argument("--output_len", type=int, default=16, help="generated tokens per request")
    p.add_argument("--ttft_reps", type=int, default=5, help="first-token latency: requests per kind (median)")
    p.add_argument("--max_batch", type=int, default=32, help="the servers' --max_batch")
    p.add_argument("--batch_window_ms", type=float, default=5.0, help="the servers' --batch_window_ms")
    common.add_run_args(p)
    a, gpu = common.parse_run_args(p, argv)
    if not argv or "--recipe" not in argv:
        a.recipe = ["tiny"] if (a.smoke or not gpu) else GPU_SERVE_RECIPES
    if a.requests is None:
        a.requests = 256 if gpu else 64
    if a.smoke:
        a.distinct, a.requests, a.clients, a.instr_len, a.input_len, a.output_len = [1, 2], 8, 4, 64, 16, 4
        a.ttft_reps = 2
    for key in ("requests", "clients", "instr_len", "input_len", "output_len", "max_batch", "ttft_reps"):
        if getattr(a, key) <= 0:
            p.error(f"--{key} must be > 0, got {getattr(a, key)}")
    if any(d <= 0 for d in a.distinct):
        p.error(f"--distinct must be > 0, got {a.distinct}")
    return a


def config(recipe: str, args):
    """The recipe with budgets that hold the whole instruction and input, in either variant."""
    cfg = get_recipe(recipe)
    return apply_overrides(
        cfg,
        [
            f"data.max_instruction_length={args.instr_len + 8}",
            f"data.max_source_length={args.instr_len + args.input_len + 64}",
            *args.overrides,
        ],
    )


def write_hypernet(cfg, path: Path) -> Path:
    """A hypernet/ dir of ``cfg``'s shape: the model on the meta device (a 7B backbone costs nothing here; each
    server builds its own), a real (random) generator. Written as ``artifacts.save_hypernet`` lays it out but
    without the backbone fingerprint (a meta backbone has no weights to hash; the loader then takes it as it is)."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    from tagi_ds import assembly, data, families, stages
    from tagi_ds.hypernet import Generator
    from tagi_ds.model import fuses

    tok = data.load_tokenizer(cfg)
    model = assembly.meta_model(cfg, stages.spec("finetune", cfg), tok.special_ids)
    d = getattr(model.backbone.config, families.get(cfg.model.arch).shape["d_model"])  # as build_model reads it
    generator = Generator(d, model.sites, cfg.hypernet, fusion=fuses(cfg))
    path.mkdir(parents=True)
    save_file(
        {k: v.float().contiguous() for k, v in generator.state_dict().items()}, str(path / "generator.safetensors")
    )
    meta = {"tagi": cfg.to_dict(), "sites": [dataclasses.asdict(s) for s in model.sites]}
    (path / "config.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return path


def text_of(tok, rng: random.Random, n: int, head: str = "") -> str:
    """``head`` + random words, cut to ``n`` tokens of ``tok``."""
    words = head.split()
    while len(tok.encode(" ".join(words))) < n:
        words += [rng.choice(WORDS) for _ in range(8)]
    while len(tok.encode(" ".join(words))) > n:
        words.pop()
    return " ".join(words)


class Server:
    def __init__(self, hypernet: Path, mode: str, args, log: Path) -> None:
        from tagi_ds.launch import free_port

        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("TRITON_INTERPRET", None)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        cmd = [
            sys.executable,
            "-m",
            "tagi_ds.serve",
            "--hypernet",
            str(hypernet),
            "--port",
            str(self.port),
            "--mode",
            mode,
            "--max_batch",
            str(args.max_batch),
            "--batch_window_ms",
            str(args.batch_window_ms),
            "--max_tokens",
            str(args.output_len),
            "--max_request_bytes",
            str(1 << 24),
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.log = log
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {mode} server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the {mode} server did not come up in {START_S} s")

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        try:
            conn.request(
                method, path, json.dumps(body) if body is not None else None, {"content-type": "application/json"}
            )
            r = conn.getresponse()
            raw = r.read().decode()
            return r.status, (
                json.loads(raw) if r.headers.get("content-type", "").startswith("application/json") else raw
            )
        finally:
            conn.close()

    def metric(self, name: str) -> float:
        text = self.request("GET", "/metrics")[1]
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"tagi_{name}"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load_point(server: Server, bodies: list[dict], clients: int) -> dict:
    """Closed loop: ``clients`` threads, each sending the next body as soon as its last answer came."""
    latencies, tokens, errors = [], [], []
    nxt = iter(range(len(bodies)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.perf_counter()
            status, body = server.request("POST", "/v1/completions", bodies[i])
            dt = time.perf_counter() - t0
            with lock:
                if status != 200:
                    errors.append(f"{status}: {body}")
                else:
                    latencies.append(dt)
                    tokens.append(body["usage"]["completion_tokens"])

    generations = server.metric("adapter_generations_total")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0][:300]}")
    return {
        "wall_s": wall,
        "requests_per_s": len(bodies) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "completion_tokens": sum(tokens),
        "adapters_generated": server.metric("adapter_generations_total") - generations,
    }


def first_token(server: Server, bodies: list[dict]) -> float:
    """The median latency (ms) of ``bodies`` sent one at a time with ``max_tokens=1``."""
    import statistics

    times = []
    for body in bodies:
        t0 = time.perf_counter()
        status, answer = server.request("POST", "/v1/completions", {**body, "max_tokens": 1})
        times.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"first-token request failed: {status}: {answer}")
    return 1000 * statistics.median(times)


def table(result: dict) -> str:
    lines = common.md_head(
        "Serving: TAGI vs concat",
        result,
        "CPU numbers check the harness and compare variants on this host; they are not GPU numbers.",
    )
    a = result["args"]
    lines += [
        f"{a['requests']} requests per point from {a['clients']} clients; instructions of {a['instr_len']} "
        f"tokens, inputs of {a['input_len']}, {a['output_len']} generated tokens each; max_batch "
        f"{a['max_batch']}, window {a['batch_window_ms']} ms. Host load at the start: {result['host_load']}.",
        "",
        "| recipe | distinct | mode | requests/s | tokens/s | p50 ms | p99 ms | adapters generated | "
        "tagi / concat requests/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        twin = next(
            (
                q
                for q in result["points"]
                if q["recipe"] == p["recipe"] and q["distinct"] == p["distinct"] and q["mode"] == "concat"
            ),
            None,
        )
        ratio = f"{p['requests_per_s'] / twin['requests_per_s']:.2f}x" if twin and p["mode"] == "tagi" else ""
        lines.append(
            f"| {p['recipe']} | {p['distinct']} | {p['mode']} | {p['requests_per_s']:.2f} | "
            f"{p['tokens_per_s']:.1f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
            f"{p['adapters_generated']:.0f} | {ratio} |"
        )
    if result["first_token"]:
        lines += [
            "",
            "First-token latency, one request at a time (max_tokens=1: prefill + one token, HTTP included; median ms):",
            "",
            "| recipe | tagi, unseen instruction | tagi, cached | concat | unseen - cached |",
            "|---|---|---|---|---|",
        ]
        for recipe, f in result["first_token"].items():
            got = {k: f.get(k, float("nan")) for k in ("tagi_unseen_ms", "tagi_cached_ms", "concat_ms")}
            lines.append(
                f"| {recipe} | {got['tagi_unseen_ms']:.1f} | {got['tagi_cached_ms']:.1f} | "
                f"{got['concat_ms']:.1f} | {got['tagi_unseen_ms'] - got['tagi_cached_ms']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def save_point(args, result: dict) -> None:
    """After every point: a run cut short keeps what it measured."""
    if not args.no_save:
        common.save_results(args.out_dir, common.result_name("serve", args.tag), result, table(result), quiet=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from tagi_ds import data

    result = {
        "name": "serve",
        "date": datetime.date.today().isoformat(),
        "device_kind": common.device_kind(),
        "device_label": common.device_label(),
        "versions": common.versions(),
        "host_load": common.host_load(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "points": [],
        "first_token": {},
    }
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        for recipe in args.recipe:
            cfg = config(recipe, args)
            tok = data.load_tokenizer(cfg)
            hypernet = write_hypernet(cfg, Path(tmp) / recipe / "hypernet")
            inputs = [text_of(tok, rng, args.input_len) for _ in range(args.requests)]
            for mode in ("concat", "tagi"):
                server = Server(hypernet, mode, args, Path(tmp) / f"{recipe}_{mode}.log")
                try:
                    for d in args.distinct:
                        # fresh instructions per point: tagi pays each one's adapter within the point
                        instructions = [
                            text_of(tok, rng, args.instr_len, f"task {recipe} {mode} {d} {k}:") for k in range(d)
                        ]
                        bodies = [
                            {
                                "instruction": instructions[i % d],
                                "prompt": inputs[i],
                                "max_tokens": args.output_len,
                                "ignore_eos": True,
                            }
                            for i in range(args.requests)
                        ]
                        point = {
                            "recipe": recipe,
                            "mode": mode,
                            "distinct": d,
                            **load_point(server, bodies, args.clients),
                        }
                        result["points"].append(point)
                        print(
                            f"{recipe} {mode} distinct={d}: {point['requests_per_s']:.2f} req/s, "
                            f"{point['tokens_per_s']:.1f} tok/s, p50 {point['p50_ms']:.0f} ms, p99 "
                            f"{point['p99_ms']:.0f} ms",
                            file=sys.stderr,
                            flush=True,
                        )
                        save_point(args, result)
                    fresh = [
                        {
                            "instruction": text_of(tok, rng, args.instr_len, f"unseen {recipe} {k}:"),
                            "prompt": inputs[k % len(inputs)],
                            "ignore_eos": True,
                        }
                        for k in range(args.ttft_reps)
                    ]
                    f = result["first_token"].setdefault(recipe, {})
                    if mode == "tagi":
                        f["tagi_unseen_ms"] = first_token(server, fresh)
                        f["tagi_cached_ms"] = first_token(server, fresh)  # the same instructions again: cached
                    else:
                        f["concat_ms"] = first_token(server, fresh)
                    save_point(args, result)
                finally:
                    server.stop()
    common.emit(args, "serve", result, table(result))


if __name__ == "__main__":
    main()
