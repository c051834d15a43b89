"""python -m tagi_ds.serve: answer instructions over HTTP with a trained hypernetwork (OpenAI-compatible API).

The backbone and the hypernetwork are loaded once; each instruction's adapter is generated once and cached;
requests that arrive together are decoded in one batch whatever their instructions.

    python -m tagi_ds.serve --hypernet runs/finetune/hypernet --port 8000
    curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' -d '{"messages": [
      {"role": "system", "content": "Reverse the order of the words."},
      {"role": "user", "content": "red green blue"}]}'

Endpoints: POST /v1/chat/completions (system message = instruction, user message = input), POST /v1/completions
(`instruction` beside `prompt`), POST /v1/adapters (instruction -> content-hash id), GET /v1/models, /health,
/metrics (Prometheus text). See tagi_ds/serve/app.py and README "Serve".
"""

from __future__ import annotations

import math
import socket
import textwrap
import warnings

from tagi_ds.cli import Parser, add_set_flag, guarded
from tagi_ds.config import ConfigError

MODES = ("tagi", "concat")
BACKLOG = 2048  # uvicorn's default


def parser() -> Parser:
    p = Parser(
        prog="python -m tagi_ds.serve",
        description=__doc__,
        epilog=textwrap.fill(
            "The hypernet's config.json fixes the model (as for evaluate.py and generate_adapter.py). Every flag "
            "and the hypernet/ dir are checked, and the port is bound and listening, before the model is built (so a "
            "port another server holds is an error at once); connections made while the model loads wait and are "
            "answered once it is. Bad input: one line 'error: ...' and exit code 2. Stops on SIGINT / SIGTERM.",
            width=100,
        ),
    )
    p.add_argument("--hypernet", required=True, metavar="DIR", help="hypernet/ dir from pretrain.py or finetune.py")
    p.add_argument(
        "--model_name_or_path",
        default=None,
        metavar="PATH",
        help="local HF checkpoint dir for the backbone (default: the hypernet's config: its checkpoint, or "
        "the recipe's random-init shape)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed at start)")
    p.add_argument("--max_batch", type=int, default=32, help="most requests decoded together in one batch")
    p.add_argument(
        "--batch_window_ms",
        type=float,
        default=5.0,
        help="how long the first waiting request waits for others to join its batch (ms)",
    )
    p.add_argument(
        "--adapter_cache_mb",
        type=float,
        default=1024.0,
        help="bound of the adapter cache (MiB; least recently used adapters leave first)",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        default=128,
        help="a request's max_tokens when it gives none, and the most it may ask for",
    )
    p.add_argument("--max_request_bytes", type=int, default=262144, help="largest request body taken (bigger: 413)")
    p.add_argument(
        "--max_queue",
        type=int,
        default=1024,
        help="most requests waiting for a batch; one more gets 429 (OpenAI's rate-limit error: retry later)",
    )
    p.add_argument(
        "--adapter_export_dir",
        default=None,
        metavar="DIR",
        help='where POST /v1/adapters with "export": true writes PEFT adapter dirs, one per adapter id '
        "(default: none; export refused)",
    )
    p.add_argument(
        "--served_name",
        default="tagi",
        metavar="NAME",
        help="the model id of /v1/models; a request naming another model gets 404",
    )
    p.add_argument(
        "--mode",
        default="tagi",
        choices=MODES,
        help="tagi: adapters generated from the instruction; concat: no adapters, the backbone reads "
        "the instruction prepended to every input (Tk-Instruct's format; the benchmark's baseline)",
    )
    add_set_flag(p, help="override a config field of the hypernet's config, e.g. --set model.adapter_impl=torch")
    return p


def check_flags(args) -> None:
    for flag in ("max_batch", "max_tokens", "max_request_bytes", "max_queue"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag}: must be > 0 ({getattr(args, flag)})")
    if not (math.isfinite(args.batch_window_ms) and args.batch_window_ms >= 0):
        raise ConfigError(f"--batch_window_ms: must be >= 0 and finite ({args.batch_window_ms})")
    if not (math.isfinite(args.adapter_cache_mb) and args.adapter_cache_mb > 0):
        raise ConfigError(f"--adapter_cache_mb: must be > 0 and finite ({args.adapter_cache_mb})")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: must be in [0, 65535] ({args.port})")
    if not args.served_name.strip():
        raise ConfigError("--served_name: empty")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound and listening now (so a taken port is one error line before any model is built)
    and handed to uvicorn, which serves it once the model is loaded; connections made meanwhile wait in the
    backlog. Listening matters: with SO_REUSEADDR two sockets that only bind share a port on Linux, so a second
    server would pass this check and fail after loading its model."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"--host {host!r}: cannot resolve it ({err.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        raise ConfigError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    check_flags(args)
    import argparse

    from tagi_ds.artifact_flags import artifact_config, artifact_dir  # heavy (torch): after --help

    hypernet = artifact_dir("hypernet", args.hypernet)
    ns = argparse.Namespace(
        recipe=None,
        overrides=args.overrides,
        model_name_or_path=args.model_name_or_path,
        data=None,
        mode=None,
        seed=None,
    )
    cfg = artifact_config(ns, hypernet, "tagi", "hypernet")
    from tagi_ds.serve import engine as serve_engine

    tok = serve_engine.preflight(cfg, hypernet)
    export_dir = None
    if args.adapter_export_dir is not None:
        from tagi_ds.runtime.preflight import check_output_dir

        export_dir = check_output_dir(args.adapter_export_dir, "--adapter_export_dir")
    sock = bind(args.host, args.port)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import uvicorn

    from tagi_ds.serve.app import Limits, create_app
    from tagi_ds.serve.metrics import Metrics
    from tagi_ds.serve.scheduler import Scheduler

    metrics = Metrics()
    engine = serve_engine.load(cfg, hypernet, tok, int(args.adapter_cache_mb * 2**20), metrics, args.mode)
    scheduler = Scheduler(engine, args.max_batch, args.batch_window_ms / 1000)
    host, port = sock.getsockname()[:2]

    def ready() -> None:
        print(
            f"tagi-ds serve: http://{host}:{port} (model {args.served_name}, mode {args.mode}, "
            f"{cfg.recipe} {cfg.model.arch} on {engine.device}, {len(engine.model.sites)} adapted sites, "
            f"max_batch {args.max_batch}, window {args.batch_window_ms:g} ms)",
            flush=True,
        )

    limits = Limits(args.max_tokens, args.max_request_bytes, args.max_queue)
    app = create_app(scheduler, args.served_name, limits, on_ready=ready, export_dir=export_dir)
    scheduler.start()
    # a stream still open at SIGTERM gets 5 s to end, then the server stops anyway
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    )
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.stop()
        sock.close()


if __name__ == "__main__":
    guarded(main)
