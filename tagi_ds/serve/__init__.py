"""Serving a trained hypernetwork over HTTP (``python -m tagi_ds.serve``): instruction in, answer out.

``engine.py`` loads the backbone and the hypernetwork once and lays out a batch; ``cache.py`` holds the generated
adapters (LRU in bytes, one generation per new instruction); ``decode.py`` decodes a batch of requests with
different instructions together (per-task segmented adapters, KV cache, finished rows leave); ``scheduler.py`` is
the one engine thread that forms the batches and interleaves their steps; ``app.py`` the OpenAI-compatible HTTP
API; ``metrics.py`` its Prometheus counters.
"""
