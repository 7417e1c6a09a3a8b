"""Load tests of the gateway: Locust scenarios, the runner that starts everything they need and
writes a report (``python -m loadtests run ...``), and the benchmarks beside them
(``peer_bench_app``, ``proxy_clients``, ``cluster_scaleout``).

Nothing in this package imports ``locust`` except ``locustfile.py`` and ``scenarios/``, which
only ever run inside the Locust process the runner starts: gevent monkey-patches whatever
process imports Locust.
"""
