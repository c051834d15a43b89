"""The serving engine in this process (no HTTP): rows leave the batch when they end, segments stay right as they
do, and the adapter cache (LRU in bytes, one generation per key however many callers wait for it)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from tagi_ds import data
from tagi_ds.serve import decode
from tagi_ds.serve.cache import Adapter, AdapterCache
from tagi_ds.serve.engine import Request, load, preflight
from tagi_ds.serve.metrics import Metrics
from tagi_ds.serve.scheduler import Scheduler
from tests.core.helpers import tiny_cfg
from tests.serve.test_serve import EXAMPLES, make_hypernet


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_hypernet("tiny", tmp_path_factory.mktemp("engine") / "hypernet")
    from tagi_ds.artifacts import read_config

    cfg = read_config(path)
    return load(cfg, path, preflight(cfg, path), 1 << 30, Metrics())


def serve(engine, requests):
    results = {}

    def collect(i):
        return lambda kind, value: results.__setitem__(i, value) if kind == "done" else None

    for i, r in enumerate(requests):
        r.emit = collect(i)
    engine.resolve(requests)
    decode.run(engine, requests)
    return [results[i] for i in range(len(requests))]


def test_rows_that_end_leave_the_batch(engine):
    (t0, e0), (t1, e1) = EXAMPLES[0], EXAMPLES[2]
    wants = [
        (t0.definitions[0], e0.input, 2),
        (t0.definitions[0], e1.input, 7),
        (t1.definitions[0], e1.input, 5),
        (t1.definitions[0], e0.input, 1),
    ]
    alone = [serve(engine, [Request(i, x, max_tokens=n)])[0] for i, x, n in wants]
    rows_per_step = []
    hook = engine.model.backbone.lm_head.register_forward_hook(lambda m, a, o: rows_per_step.append(a[0].shape[0]))
    try:
        together = serve(engine, [Request(i, x, max_tokens=n) for i, x, n in wants])
    finally:
        hook.remove()
    counts = [r["completion_tokens"] for r in together]
    # step j computes only the rows that have not ended before it (HF generate would keep all 4 to the end)
    assert rows_per_step == [sum(c >= j for c in counts) for j in range(1, max(counts) + 1)]
    assert rows_per_step[0] == 4 and rows_per_step[-1] < 4
    # answers do not depend on the rows around them, even as a whole instruction's segment leaves the batch
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["adapter"] for r in together] == [r["adapter"] for r in alone]
    assert len({r["text"] for r in together}) >= 2
    # the instruction matters (the same input, four instructions: not one answer), so the checks above mean something
    same_input = [Request(task.definitions[0], e0.input, max_tokens=8) for task, _ in EXAMPLES[::2]]
    assert len({r["text"] for r in serve(engine, same_input)}) >= 2
    # ignore_eos decodes max_tokens tokens whatever comes (the benchmark's fixed work per request)
    (long,) = serve(engine, [Request(t0.definitions[0], e0.input, max_tokens=9, ignore_eos=True)])
    assert long["completion_tokens"] == 9 and long["finish_reason"] == "length"


def test_the_cached_adapter_is_what_generate_adapter_exports(engine):
    """The server's adapter for a text = ``export/peft.generate_factors`` for it (launchers/generate_adapter.py)."""
    from tagi_ds.export.peft import condition_text, generate_factors, instruction_tensors

    text = EXAMPLES[0][0].definitions[0]
    req = Request(text, "", adapter_only=True)
    engine.resolve([req, Request("Another instruction read in the same forward.", "", adapter_only=True)])
    ids, mask = instruction_tensors(engine.tok, engine.cfg, condition_text(text, "task"))
    want = generate_factors(engine.model, ids, mask)
    assert len(req.adapter.factors) == len(want) == len(engine.model.sites)
    for (A, B), (wa, wb) in zip(req.adapter.factors, want):
        torch.testing.assert_close(A, wa, rtol=0, atol=1e-6)
        torch.testing.assert_close(B, wb, rtol=0, atol=1e-6)


def test_fusion_keys_values_are_cached_with_the_adapter(engine):
    """T5 fusion: the instruction's cross-attention keys/values are projected once, with its adapter; a batch
    afterwards projects only its inputs (every call of a cross-attention k reads input-length rows)."""
    task, ex = EXAMPLES[3]
    req = Request(task.definitions[0] + " (fusion check)", ex.input, max_tokens=3)
    engine.resolve([req])
    a = req.adapter
    blocks = engine.model.backbone.decoder.block
    assert len(a.cross_kv) == len(blocks) and a.cross_kv[0][0].shape[1] == a.instruction_tokens
    assert a.nbytes > sum(x.numel() * x.element_size() for pair in a.factors for x in pair)
    lengths = []
    hook = blocks[0].layer[1].EncDecAttention.k.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    try:
        (alone,) = serve(engine, [Request(req.instruction, ex.input, max_tokens=3)])
    finally:
        hook.remove()
    width = engine.prompt_batch([req]).input_ids.shape[1]
    assert lengths == [width] and alone["cache"] == "hit"


def adapter(key: str, nbytes: int) -> Adapter:
    return Adapter(key, [(torch.zeros(nbytes // 4), torch.zeros(0))], None, 1)


def test_cache_is_an_lru_bounded_in_bytes():
    metrics = Metrics()
    cache = AdapterCache(max_bytes=3000, metrics=metrics)
    make = lambda keys: [adapter(k, 1000) for k in keys]
    cache.resolve(["a", "b", "c"], make)
    assert len(cache) == 3 and cache.nbytes == 3000
    cache.resolve(["a"], make)  # a becomes the most recently used: b leaves first
    found, generated = cache.resolve(["d"], make)
    assert generated == {"d"} and "b" not in cache and {"a", "c", "d"} == {k for k in "abcd" if k in cache}
    assert metrics.value("adapter_cache_evictions_total") == 1 and cache.nbytes == 3000
    found, generated = cache.resolve(["huge"], lambda keys: [adapter(k, 4000) for k in keys])
    assert found["huge"].id == "huge" and "huge" not in cache and len(cache) == 3  # used once, never kept


def test_concurrent_callers_of_a_new_key_generate_it_once():
    cache = AdapterCache(max_bytes=1 << 20, metrics=Metrics())
    calls, started = [], threading.Event()

    def slow(keys):
        calls.append(list(keys))
        started.set()
        time.sleep(0.3)  # the others arrive while this generation runs
        return [adapter(k, 16) for k in keys]

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.resolve(["k"], slow)[0]["k"])) for _ in range(8)]
    threads[0].start()
    started.wait(60)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(60)
    assert calls == [["k"]] and len(got) == 8 and all(a is got[0] for a in got)

    def broken(keys):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.resolve(["x"], broken)
    assert cache.resolve(["x"], lambda keys: [adapter(k, 16) for k in keys])[1] == {"x"}  # a failure is not cached


def test_prompt_layout_is_the_evaluation_collators(engine):
    """The rows the backbone reads are those evaluate.py's loader builds for the same instruction and input."""
    task, ex = EXAMPLES[1]
    batch = engine.prompt_batch([Request(task.definitions[0], ex.input)])
    cfg = tiny_cfg("tiny")
    tok = data.load_tokenizer(cfg)
    one = task.__class__(**{**task.__dict__, "instances": (ex,)})
    want = next(iter(data.build_eval_loader(cfg, tok, "test", tasks=[one], batch_size=1)))
    assert torch.equal(batch.input_ids.cpu(), want.input_ids) and torch.equal(
        batch.attention_mask.cpu(), want.attention_mask
    )


def scheduled(engine, requests, **kw) -> list[tuple[str, object]]:
    """Each request's last event (``("done", result)`` or ``("error", exc)``) through a real Scheduler."""
    events = [threading.Event() for _ in requests]
    last: dict[int, tuple[str, object]] = {}

    def collect(i):
        def emit(kind, value):
            if kind in ("done", "error"):
                last[i] = (kind, value)
                events[i].set()

        return emit

    sched = Scheduler(engine, kw.get("max_batch", 32), kw.get("window_s", 0.0))
    for i, r in enumerate(requests):
        r.emit = collect(i)
        sched.submit(r)  # all queued before the thread starts: one batch
    sched.start()
    try:
        for e in events:
            assert e.wait(120), "hang guard: a request got no answer"
    finally:
        sched.stop()
    return [last[i] for i in range(len(requests))]


def test_a_request_that_breaks_its_batch_fails_alone(engine):
    """A request the engine cannot serve (a seed torch cannot take, a lone surrogate in the instruction) gets its
    error; the requests batched with it are answered as if alone (the old scheduler failed the whole batch)."""
    (t0, e0), (t1, e1) = EXAMPLES[0], EXAMPLES[2]
    good = [Request(t0.definitions[0], e0.input, max_tokens=4), Request(t1.definitions[0], e1.input, max_tokens=4)]
    alone = [serve(engine, [Request(r.instruction, r.prompt, max_tokens=4)])[0]["text"] for r in good]
    bad = [
        Request(t0.definitions[0], e1.input, max_tokens=4, temperature=0.5, seed=2**70),
        Request("\ud800 copy", e0.input, max_tokens=4),
    ]
    got = scheduled(engine, [good[0], bad[0], bad[1], good[1]])
    assert [k for k, _ in got] == ["done", "error", "error", "done"], got
    assert [got[0][1]["text"], got[3][1]["text"]] == alone


def test_a_short_request_never_waits_for_long_ones(engine):
    """Four long one-row batches decoding, then a short request: it starts at once and ends first (the old
    scheduler ran at most 4 batches, so the short one waited for a long one to end)."""
    task, ex = EXAMPLES[0]
    order: list[str] = []
    ended = threading.Event()

    def note(name):
        def emit(kind, value):
            if kind in ("done", "error"):
                order.append(name)
                if name == "short":
                    ended.set()

        return emit

    sched = Scheduler(engine, 32, 0.0)
    sched.start()
    longs = [
        Request(task.definitions[0], ex.input, max_tokens=400, ignore_eos=True, emit=note(f"long{i}")) for i in range(4)
    ]
    try:
        for k, r in enumerate(longs):  # one at a time, so each is its own batch
            sched.submit(r)
            deadline = time.monotonic() + 120
            while len(sched.running) < k + 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(sched.running) == k + 1 and not order, (k, order)
        sched.submit(Request(task.definitions[0], ex.input, max_tokens=2, emit=note("short")))
        assert ended.wait(120), "hang guard"
        assert order[0] == "short", order
    finally:
        for r in longs:
            r.cancelled.set()
        sched.stop()


def test_metrics_print_values_in_full():
    """Prometheus text keeps every digit: counters and gauges that are integers as integers, sums by repr (the old
    ``:g`` printed 1234567 as 1.23457e+06)."""
    m = Metrics()
    m.inc("prompt_tokens_total", 1234567)
    m.inc("requests_total", 3, endpoint="/health", status="200")
    m.set("adapter_cache_bytes", 2**40 + 1)
    m.observe("request_seconds", 0.1234567891)
    lines = m.render().splitlines()
    assert "tagi_prompt_tokens_total 1234567" in lines
    assert 'tagi_requests_total{endpoint="/health",status="200"} 3' in lines
    assert f"tagi_adapter_cache_bytes {2**40 + 1}" in lines
    assert "tagi_request_seconds_sum 0.1234567891" in lines and "tagi_request_seconds_count 1" in lines
    assert "tagi_completion_tokens_total 0" in lines


def test_a_tiny_temperature_decodes_greedily(engine):
    """temperature 1e-40: logits / T overflow and softmax is NaN (the old draw took the least likely token);
    below decode.GREEDY_BELOW a row decodes greedily."""
    task, ex = EXAMPLES[1]
    (greedy,) = serve(engine, [Request(task.definitions[0], ex.input, max_tokens=6, ignore_eos=True)])
    for t in (1e-40, 1e-6):
        (tiny,) = serve(
            engine, [Request(task.definitions[0], ex.input, max_tokens=6, ignore_eos=True, temperature=t, seed=3)]
        )
        assert tiny["text"] == greedy["text"], t


def test_the_adapter_id_covers_the_instruction_layout(engine, tmp_path):
    """data.max_instruction_length / data.chat_template change what the hypernetwork reads (a --set over the
    hypernet's config): the fingerprint, hence every adapter id, changes with them (the old one hashed only
    config.json and the model fields)."""
    import copy

    from tagi_ds.serve.engine import fingerprint

    hypernet = tmp_path / "hypernet"
    from tagi_ds import artifacts

    artifacts.save_hypernet(engine.model, hypernet)
    base = fingerprint(hypernet, engine.cfg, engine.model)
    assert fingerprint(hypernet, copy.deepcopy(engine.cfg), engine.model) == base
    shorter = copy.deepcopy(engine.cfg)
    shorter.data.max_instruction_length = engine.cfg.data.max_instruction_length // 2
    assert fingerprint(hypernet, shorter, engine.model) != base


def test_a_request_cancelled_in_the_queue_is_counted(engine):
    """A request whose client left before its batch started never gets a row: still a cancel in /metrics."""
    task, ex = EXAMPLES[0]
    before = engine.metrics.value("requests_cancelled_total")
    gone = Request(task.definitions[0], ex.input, max_tokens=2)
    gone.cancelled.set()
    got = scheduled(engine, [gone, Request(task.definitions[0], ex.input, max_tokens=2)])
    assert got[0] == ("done", {"finish_reason": "cancelled"}) and got[1][0] == "done"
    assert engine.metrics.value("requests_cancelled_total") == before + 1


def test_a_stopped_engine_thread_answers_503(engine):
    """An engine thread that is not running (died, or never started) would never answer: completions and adapter
    requests get 503 at once, /health says so (the old server queued them forever)."""
    from fastapi.testclient import TestClient

    from tagi_ds.serve.app import Limits, create_app

    app = create_app(Scheduler(engine, 4, 0.0), "tagi", Limits(16, 1 << 20, 8))  # its thread never started
    with TestClient(app) as client:
        task, ex = EXAMPLES[0]
        r = client.post("/v1/completions", json={"instruction": task.definitions[0], "prompt": ex.input})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
        r = client.post("/v1/adapters", json={"instruction": task.definitions[0]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
        assert client.get("/health").status_code == 503
