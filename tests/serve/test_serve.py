"""python -m tagi_ds.serve as a real server in a subprocess, on a free port, over tiny T5 and tiny-llama hypernets.

One server per family for the whole module (started on first use, ended at the module's end). The hypernets are
the evaluation tests' (a generator whose head_B is drawn, so generated adapters matter) on ``model.init_seed=8``,
a random tiny backbone whose greedy answers differ between inputs. Every wait is a hang guard (HANG_S), polling an
event (the port answering, a counter moving), never a speed check.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tagi_ds import artifacts
from tagi_ds.data.builtin import builtin_suite
from tagi_ds.model import build_backbone, build_model
from tests.core.helpers import perturb, tiny_cfg
from tests.train.harness import HANG_S, REPO, env, free_port

TASKS = builtin_suite(0)["test"][:4]  # 4 held-out tasks x 2 instances: the examples compared with evaluate.py
EXAMPLES = [(t, ex) for t in TASKS for ex in t.instances[:2]]
MAX_TOKENS = 8
CAP = 2000  # the test servers' --max_tokens: long enough that a stream is still running when its client leaves


def make_hypernet(recipe: str, path: Path) -> Path:
    cfg = tiny_cfg(recipe)
    cfg.model.init_seed = 8
    torch.manual_seed(0)
    model = build_model(cfg, "finetune", build_backbone(cfg))
    perturb(model)
    artifacts.save_hypernet(model, path)
    return path


class Server:
    def __init__(self, hypernet: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            sys.executable,
            "-m",
            "tagi_ds.serve",
            "--hypernet",
            str(hypernet),
            "--port",
            str(self.port),
            "--batch_window_ms",
            "100",
            "--max_tokens",
            str(CAP),
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env(), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited with {self.proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        pytest.fail(f"hang guard: the server did not answer /health in {HANG_S} s:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=HANG_S) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def post(self, path: str, body, raw: bool = False) -> tuple[int, dict]:
        data = body if raw else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=HANG_S) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def stream(self, path: str, body: dict) -> list[dict]:
        """The events of a streamed answer, up to ``data: [DONE]``."""
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps({**body, "stream": True}).encode(),
            headers={"content-type": "application/json"},
        )
        events = []
        with urllib.request.urlopen(req, timeout=HANG_S) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    return events
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        raise AssertionError("the stream ended without data: [DONE]")

    def metric(self, name: str) -> float:
        """The sum of a counter's series in /metrics."""
        text = self.get("/metrics")[1].decode()
        return sum(float(v) for v in re.findall(rf"^tagi_{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def chat(system: str, user: str, **kw) -> dict:
    return {
        "model": "tagi",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": MAX_TOKENS,
        **kw,
    }


def answer(server: Server, system: str, user: str, **kw) -> dict:
    status, body = server.post("/v1/chat/completions", chat(system, user, **kw))
    assert status == 200, body
    return body


@pytest.fixture(scope="module")
def hypernets(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {r: make_hypernet(r, root / r / "hypernet") for r in ("tiny", "tiny-llama")}


@pytest.fixture(scope="module")
def servers(hypernets, tmp_path_factory):
    """``servers(recipe)``: that family's running server, started on first use."""
    running: dict[str, Server] = {}

    def get(recipe: str) -> Server:
        if recipe not in running:
            logs = tmp_path_factory.mktemp("log")
            running[recipe] = Server(
                hypernets[recipe], logs / f"{recipe}.log", "--adapter_export_dir", str(logs / "peft")
            )
        return running[recipe]

    yield get
    for s in running.values():
        s.stop()


@pytest.mark.parametrize("recipe", ["tiny", "tiny-llama"])
def test_greedy_answers_equal_evaluate_predictions(recipe, hypernets, servers, tmp_path):
    """The same instruction + input, token for token: the server's greedy answer is evaluate.py's prediction."""
    out = tmp_path / "eval"
    names = json.dumps([t.name for t in TASKS])
    cmd = [
        sys.executable,
        str(REPO / "launchers" / "evaluate.py"),
        "--hypernet",
        str(hypernets[recipe]),
        "--max_new_tokens",
        str(MAX_TOKENS),
        "--set",
        "data.max_instances_per_task=2",
        f"data.tasks={names}",
        "--output_dir",
        str(out),
    ]
    evaluating = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = servers(recipe)  # starts while evaluate.py runs
    got = {}

    def ask(task, ex):
        got[ex.id] = answer(server, task.definitions[0], ex.input)

    threads = [threading.Thread(target=ask, args=pair) for pair in EXAMPLES]  # batched together, as evaluate does
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    log, _ = evaluating.communicate(timeout=HANG_S)
    assert evaluating.returncode == 0, log[-3000:]
    records = map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    predictions = {r["id"]: r["prediction"] for r in records}
    assert len(predictions) == len(EXAMPLES) == len(got)
    for _, ex in EXAMPLES:
        assert got[ex.id]["choices"][0]["message"]["content"] == predictions[ex.id], ex.id
    assert len(set(predictions.values())) >= 3  # non-degenerate answers: the comparison means something
    one = got[EXAMPLES[0][1].id]
    assert one["usage"]["completion_tokens"] <= MAX_TOKENS and one["usage"]["prompt_tokens"] > 0
    assert one["tagi"]["adapter"].startswith("tagi-")
    # /v1/completions: the instruction beside the prompt, the same answer
    task, ex = EXAMPLES[0]
    status, body = server.post(
        "/v1/completions", {"instruction": task.definitions[0], "prompt": ex.input, "max_tokens": MAX_TOKENS}
    )
    assert status == 200 and body["choices"][0]["text"] == predictions[ex.id]


def test_second_request_with_the_same_instruction_does_not_run_the_hypernetwork(servers):
    server = servers("tiny")
    instruction = "Write every word of the input twice, in the same order."
    before = {
        k: server.metric(k)
        for k in ("adapter_generations_total", "adapter_cache_hits_total", "adapter_cache_misses_total")
    }
    first = answer(server, instruction, "red green blue")
    assert server.metric("adapter_generations_total") == before["adapter_generations_total"] + 1
    assert first["tagi"]["cache"] == "miss"
    second = answer(server, instruction, "one two three four")
    assert second["tagi"] == {**first["tagi"], "cache": "hit"}
    assert server.metric("adapter_generations_total") == before["adapter_generations_total"] + 1  # not run again
    assert server.metric("adapter_cache_hits_total") == before["adapter_cache_hits_total"] + 1
    assert server.metric("adapter_cache_misses_total") == before["adapter_cache_misses_total"] + 1
    # the adapter id is a content hash: POST /v1/adapters names the same one, cached; another condition another
    status, body = server.post("/v1/adapters", {"instruction": instruction})
    assert status == 200 and body["id"] == first["tagi"]["adapter"] and body["cached"] is True and body["bytes"] > 0
    status, other = server.post("/v1/adapters", {"instruction": instruction, "condition": "instance"})
    assert status == 200 and other["id"] != body["id"] and other["cached"] is False
    assert server.metric("adapter_generations_total") == before["adapter_generations_total"] + 2
    # the id stands for the instruction: not sent again, not read again
    status, by_id = server.post(
        "/v1/completions", {"adapter": body["id"], "prompt": "one two three four", "max_tokens": MAX_TOKENS}
    )
    assert status == 200 and by_id["choices"][0]["text"] == second["choices"][0]["message"]["content"]
    assert by_id["tagi"]["adapter"] == body["id"] and by_id["tagi"]["cache"] == "hit"
    chat_by_id = server.post(
        "/v1/chat/completions",
        {
            "adapter": body["id"],
            "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "one two three four"}],
        },
    )
    assert chat_by_id[0] == 200 and chat_by_id[1]["choices"][0]["message"]["content"] == by_id["choices"][0]["text"]
    assert server.post("/v1/completions", {"adapter": "tagi-" + "0" * 32, "prompt": "x"})[0] == 404
    assert server.post("/v1/completions", {"adapter": body["id"], "instruction": instruction, "prompt": "x"})[0] == 400
    assert server.metric("adapter_generations_total") == before["adapter_generations_total"] + 2
    # "export": the cached adapter in PEFT format, in a dir named by its id
    status, exported = server.post("/v1/adapters", {"instruction": instruction, "export": True})
    assert status == 200 and exported["id"] == body["id"] and exported["fusion"] is True
    peft_dir = Path(exported["peft_dir"])
    assert peft_dir.name == body["id"] and sorted(p.name for p in peft_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tagi_adapter.json",
    ]
    meta = json.loads((peft_dir / "tagi_adapter.json").read_text())
    assert meta["adapter"] == body["id"] and meta["text"] == instruction
    assert server.metric("adapter_generations_total") == before["adapter_generations_total"] + 2  # from the cache


def test_16_concurrent_clients_with_8_instructions_get_their_one_at_a_time_answers(servers):
    server = servers("tiny")
    pairs = [
        (f"{t.definitions[0]} (variant {v})", ex.input)
        for v, t in enumerate(builtin_suite(0)["test"][4:12])
        for ex in t.instances[:2]
    ]
    assert len(pairs) == 16 and len({p[0] for p in pairs}) == 8
    generations = server.metric("adapter_generations_total")
    start = threading.Barrier(len(pairs))
    got: dict[int, dict] = {}

    def client(i):
        start.wait(HANG_S)
        got[i] = answer(server, *pairs[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert len(got) == 16
    # each new instruction generated once, though two clients asked for it at the same time
    assert server.metric("adapter_generations_total") == generations + 8
    # (whether they shared batches depends on timing: tests/serve/test_engine.py batches instructions together)
    for i, (system, user) in enumerate(pairs):  # one at a time now (every adapter cached)
        alone = answer(server, system, user)
        assert alone["tagi"]["cache"] == "hit"
        assert got[i]["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"], i
    assert len({got[i]["choices"][0]["message"]["content"] for i in got}) >= 3


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.8, "seed": 7}], ids=["greedy", "sampled"])
def test_streaming_equals_non_streaming(servers, sampling):
    server = servers("tiny")
    task, ex = EXAMPLES[2]
    body = chat(task.definitions[0], ex.input, max_tokens=24, **sampling)
    whole = server.post("/v1/chat/completions", body)[1]
    events = server.stream("/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    plain = {
        "instruction": task.definitions[0],
        "prompt": ex.input,
        "max_tokens": 24,
        **sampling,
        "stream_options": {"include_usage": True},
    }
    events = server.stream("/v1/completions", plain)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == whole["choices"][0]["message"]["content"]
    assert events[-1]["usage"] == whole["usage"]
    if sampling:  # a seed fixes the draw; another seed draws another answer
        again = server.post("/v1/chat/completions", body)[1]
        assert again["choices"][0]["message"]["content"] == whole["choices"][0]["message"]["content"]
        greedy = server.post("/v1/chat/completions", chat(task.definitions[0], ex.input, max_tokens=24))[1]
        others = {
            server.post("/v1/chat/completions", {**body, "seed": s})[1]["choices"][0]["message"]["content"]
            for s in range(3)
        }
        assert others | {greedy["choices"][0]["message"]["content"]} != {whole["choices"][0]["message"]["content"]}


def test_stop_strings_and_max_tokens(servers):
    server = servers("tiny-llama")
    task, ex = EXAMPLES[0]
    full = answer(server, task.definitions[0], ex.input, max_tokens=16)["choices"][0]
    text = full["message"]["content"]
    assert len(text) >= 6, text
    stop = text[3:5]
    cut = answer(server, task.definitions[0], ex.input, max_tokens=16, stop=[stop, "\x00never"])["choices"][0]
    assert cut["message"]["content"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"
    events = server.stream("/v1/chat/completions", chat(task.definitions[0], ex.input, max_tokens=16, stop=stop))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut["message"]["content"]
    one = answer(server, task.definitions[0], ex.input, max_tokens=1)
    assert one["usage"]["completion_tokens"] == 1 and one["choices"][0]["finish_reason"] in ("length", "stop")


BAD = [  # (what, path, body (bytes: sent as is), status, param)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None),
    (
        "a 5000-digit integer",
        "/v1/completions",
        b'{"instruction": "Copy.", "prompt": "x", "seed": ' + b"9" * 5000 + b"}",
        400,
        None,
    ),
    ("50k nested arrays", "/v1/completions", b'{"instruction": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None),
    ("non-UTF-8 body", "/v1/completions", b'{"instruction": "\xff\xfe", "prompt": "x"}', 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "tagi"}, 400, "messages"),
    ("no system message", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "messages"),
    ("empty instruction", "/v1/chat/completions", chat("   ", "x"), 400, "messages"),
    (
        "two user messages",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Copy."},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
            ]
        },
        400,
        "messages",
    ),
    (
        "an assistant turn",
        "/v1/chat/completions",
        {"messages": [{"role": "system", "content": "Copy."}, {"role": "assistant", "content": "a"}]},
        400,
        "messages[1].role",
    ),
    ("missing instruction", "/v1/completions", {"prompt": "x"}, 400, "instruction"),
    ("missing prompt", "/v1/completions", {"instruction": "Copy."}, 400, "prompt"),
    ("empty instruction (completions)", "/v1/completions", {"instruction": "", "prompt": "x"}, 400, "instruction"),
    ("1 MB instruction", "/v1/completions", {"instruction": "word " * 200_000, "prompt": "x"}, 413, None),
    ("unknown model", "/v1/chat/completions", chat("Copy.", "x", model="gpt-4"), 404, "model"),
    ("max_tokens 0", "/v1/chat/completions", chat("Copy.", "x", max_tokens=0), 400, "max_tokens"),
    (
        "max_tokens negative",
        "/v1/completions",
        {"instruction": "Copy.", "prompt": "x", "max_tokens": -3},
        400,
        "max_tokens",
    ),
    (
        "max_tokens above the cap",
        "/v1/completions",
        {"instruction": "Copy.", "prompt": "x", "max_tokens": CAP + 1},
        400,
        "max_tokens",
    ),
    (
        "max_tokens not an integer",
        "/v1/completions",
        {"instruction": "Copy.", "prompt": "x", "max_tokens": "5"},
        400,
        "max_tokens",
    ),
    ("temperature out of range", "/v1/chat/completions", chat("Copy.", "x", temperature=5), 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", chat("Copy.", "x", top_p=0), 400, "top_p"),
    ("temperature NaN", "/v1/chat/completions", chat("Copy.", "x", temperature=float("nan")), 400, "temperature"),
    ("top_p NaN", "/v1/completions", {"instruction": "Copy.", "prompt": "x", "top_p": float("nan")}, 400, "top_p"),
    (
        "temperature -Infinity",
        "/v1/chat/completions",
        chat("Copy.", "x", temperature=float("-inf")),
        400,
        "temperature",
    ),
    ("five stop strings", "/v1/chat/completions", chat("Copy.", "x", stop=list("abcde")), 400, "stop"),
    ("n 2", "/v1/chat/completions", chat("Copy.", "x", n=2), 400, "n"),
    ("ignore_eos not a boolean", "/v1/chat/completions", chat("Copy.", "x", ignore_eos="yes"), 400, "ignore_eos"),
    ("unknown condition", "/v1/adapters", {"instruction": "Copy.", "condition": "both"}, 400, "condition"),
    ("empty adapter instruction", "/v1/adapters", {"instruction": " "}, 400, "instruction"),
    ("export not a boolean", "/v1/adapters", {"instruction": "Copy.", "export": "yes"}, 400, "export"),
    ("seed over 64 bits", "/v1/chat/completions", chat("Copy.", "x", temperature=0.5, seed=2**64), 400, "seed"),
    ("seed under -2**63", "/v1/chat/completions", chat("Copy.", "x", seed=-(2**63) - 1), 400, "seed"),
    ("lone surrogate instruction", "/v1/completions", b'{"instruction": "\\ud800", "prompt": "x"}', 400, "instruction"),
    (
        "lone surrogate input",
        "/v1/chat/completions",
        json.dumps(chat("Copy.", "\ud800")).encode(),
        400,
        "messages[1].content",
    ),
]


def test_bad_requests_get_their_4xx_and_the_server_stays_healthy(servers):
    server = servers("tiny")
    for what, path, body, status, param in BAD:
        got, err = server.post(path, body, raw=isinstance(body, bytes))
        assert got == status, (what, got, err)
        assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}, what
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"], what
        assert err["error"]["param"] == param, (what, err)
    code, body = server.get("/v1/nope")
    assert code == 404 and json.loads(body)["error"]["code"] == "not_found"
    code, body = server.get("/v1/completions")
    assert code == 405 and json.loads(body)["error"]["type"] == "invalid_request_error"
    code, body = server.get("/health")
    assert code == 200 and json.loads(body)["status"] == "ok"
    assert answer(server, "Copy the input.", "still here")["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_bad_request_does_not_fail_the_good_ones_batched_with_it(servers):
    """A good and a bad request in the same batch window: the good one gets its answer (the old server let the bad
    seed reach the engine, which failed the whole batch with 500), the bad one its 4xx."""
    server = servers("tiny")
    task, ex = EXAMPLES[1]
    want = answer(server, task.definitions[0], ex.input)
    bodies = [
        chat(task.definitions[0], ex.input),
        chat(task.definitions[0], ex.input, temperature=0.5, seed=2**64),
        json.dumps(chat(task.definitions[0], "\ud800")).encode(),
    ]
    got: dict[int, tuple[int, dict]] = {}
    threads = [
        threading.Thread(
            target=lambda i=i, b=b: got.__setitem__(i, server.post("/v1/chat/completions", b, raw=isinstance(b, bytes)))
        )
        for i, b in enumerate(bodies)
    ]
    for t in threads:  # within the server's 100 ms window: one batch
        t.start()
    for t in threads:
        t.join(HANG_S)
    assert got[0][0] == 200 and got[0][1]["choices"] == want["choices"], got[0]
    assert got[1][0] == 400 and got[1][1]["error"]["param"] == "seed", got[1]
    assert got[2][0] == 400 and got[2][1]["error"]["code"] == "invalid_encoding", got[2]


def test_a_client_that_leaves_mid_stream_frees_its_row(servers):
    server = servers("tiny")
    cancelled = server.metric("requests_cancelled_total")
    tokens = server.metric("completion_tokens_total")
    task, ex = EXAMPLES[0]  # the tiny T5 repeats a word here and never says eos: the stream would run CAP tokens
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_S)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat(task.definitions[0], ex.input, max_tokens=CAP, stream=True)),
        {"content-type": "application/json"},
    )
    response = conn.getresponse()
    seen = 0
    while seen < 3:  # the role chunk, then text
        if response.readline().startswith(b"data: "):
            seen += 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + HANG_S
    while server.metric("requests_cancelled_total") == cancelled and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("requests_cancelled_total") == cancelled + 1
    assert server.metric("completion_tokens_total") - tokens < CAP  # its row left the batch early
    assert json.loads(server.get("/health")[1])["status"] == "ok"
    assert answer(server, task.definitions[0], ex.input)["choices"][0]["message"]["content"]


def test_a_non_streaming_client_that_leaves_frees_its_row(servers):
    """stream false: nothing is written until the answer ends, so the server polls the connection; a client that
    closes it cancels the request (the old server decoded all CAP tokens for nobody)."""
    server = servers("tiny")
    cancelled = server.metric("requests_cancelled_total")
    tokens = server.metric("completion_tokens_total")
    task, ex = EXAMPLES[0]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_S)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat(task.definitions[0], ex.input, max_tokens=CAP, ignore_eos=True)),
        {"content-type": "application/json"},
    )
    time.sleep(1.0)  # in the engine by now (the window is 100 ms); CAP tokens take far longer
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + HANG_S
    while server.metric("requests_cancelled_total") == cancelled and time.monotonic() < deadline:
        if server.metric("completion_tokens_total") - tokens >= CAP:
            break  # decoded to the end: never cancelled (no point waiting out the hang guard)
        time.sleep(0.1)
    assert server.metric("requests_cancelled_total") == cancelled + 1
    assert server.metric("completion_tokens_total") - tokens < CAP  # its row left the batch early
    assert json.loads(server.get("/health")[1])["status"] == "ok"


def test_a_full_queue_answers_429(hypernets, tmp_path):
    """--max_batch 1 --max_queue 1: one row decoding, one request waiting; the next gets OpenAI's 429 body at once
    (the old server queued without bound)."""
    server = Server(hypernets["tiny"], tmp_path / "queue.log", "--max_batch", "1", "--max_queue", "1")
    conns = []
    try:
        task, ex = EXAMPLES[0]
        long = json.dumps(chat(task.definitions[0], ex.input, max_tokens=CAP, ignore_eos=True, stream=True))
        for _ in range(2):  # the first decodes (a stream of CAP tokens), the second waits in the queue
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_S)
            conn.request("POST", "/v1/chat/completions", long, {"content-type": "application/json"})
            conns.append(conn)
            if len(conns) == 1:
                response = conn.getresponse()
                while not response.readline().startswith(b"data: "):
                    pass
        deadline = time.monotonic() + HANG_S
        while server.metric("queue_depth") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = server.post("/v1/chat/completions", chat(task.definitions[0], ex.input))
        assert status == 429 and body["error"]["code"] == "queue_full" and "--max_queue 1" in body["error"]["message"]
        assert body["error"]["type"] == "rate_limit_error"
    finally:
        for conn in conns:
            conn.close()
        server.stop()


def test_a_short_request_does_not_wait_for_a_long_one(servers):
    """A batch that starts while another decodes runs beside it: the short answer comes while the long one goes on."""
    server = servers("tiny")
    tokens = server.metric("completion_tokens_total")
    task, ex = EXAMPLES[0]  # a stream of CAP tokens (no eos here, see the test above)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HANG_S)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(chat(task.definitions[0], ex.input, max_tokens=CAP, stream=True)),
        {"content-type": "application/json"},
    )
    response = conn.getresponse()
    seen = 0
    while seen < 3:
        if response.readline().startswith(b"data: "):
            seen += 1
    short = answer(server, EXAMPLES[1][0].definitions[0], EXAMPLES[1][1].input)
    # only the short request has ended: the long one is still decoding
    assert server.metric("completion_tokens_total") - tokens == short["usage"]["completion_tokens"]
    conn.sock.shutdown(2)
    conn.close()


def test_models_metrics_and_the_openai_client(servers):
    server = servers("tiny")
    code, body = server.get("/v1/models")
    models = json.loads(body)
    assert code == 200 and [m["id"] for m in models["data"]] == ["tagi"]
    text = server.get("/metrics")[1].decode()
    for name in (
        "requests_total",
        "prompt_tokens_total",
        "completion_tokens_total",
        "adapter_cache_hits_total",
        "adapter_cache_misses_total",
        "adapter_cache_evictions_total",
        "adapter_generation_seconds_count",
        "batch_size_bucket",
    ):
        assert f"tagi_{name}" in text, name
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=HANG_S)
    task, ex = EXAMPLES[1]
    want = answer(server, task.definitions[0], ex.input)["choices"][0]["message"]["content"]
    messages = [{"role": "system", "content": task.definitions[0]}, {"role": "user", "content": ex.input}]
    got = client.chat.completions.create(model="tagi", messages=messages, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == want and got.usage.completion_tokens > 0
    streamed = client.chat.completions.create(model="tagi", messages=messages, max_tokens=MAX_TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tagi", messages=messages, max_tokens=0)


def test_a_taken_port_is_one_error_line_before_the_model_is_built(hypernets):
    import contextlib
    import io
    import socket

    from tagi_ds.cli import guarded
    from tagi_ds.serve.__main__ import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            guarded(lambda: main(["--hypernet", str(hypernets["tiny"]), "--port", str(port)]))
    assert exit_info.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port}"), lines


def test_a_second_server_on_the_same_port_is_one_error_line_before_its_model_loads(hypernets, monkeypatch):
    """The port check listens: two servers started together on one port (both still loading, neither serving)
    no longer both pass it (bind alone with SO_REUSEADDR shares the port on Linux)."""
    import contextlib
    import io

    from tagi_ds.cli import guarded
    from tagi_ds.serve import engine as serve_engine
    from tagi_ds.serve.__main__ import bind, main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded: the port check came too late")

    monkeypatch.setattr(serve_engine, "load", no_load)
    first = bind("127.0.0.1", 0)  # the first server's socket, while its model loads
    try:
        port = first.getsockname()[1]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            guarded(lambda: main(["--hypernet", str(hypernets["tiny"]), "--port", str(port)]))
    finally:
        first.close()
    assert exit_info.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --port {port}: cannot listen on 127.0.0.1:{port}"), lines


def test_help_and_readme_document_every_flag():
    from tagi_ds.serve.__main__ import parser

    p = parser()
    text = p.format_help()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Serve") :]
    section = section[: section.index("\n## ", 1)]
    for action in p._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                assert flag in text, flag
                assert flag in section or flag == "--help", f"README 'Serve' does not name {flag}"
