"""tests/load holds benchmarks and the locust scenario, which pytest must not import.

gateway_performance_test.py matches pytest's ``*_test.py`` pattern, but importing locust
monkey-patches the process with gevent; test_locust_smoke.py runs it in a subprocess instead.
"""

collect_ignore = ["gateway_performance_test.py", "bench.py", "reload_bench.py", "hotpath.py",
                  "soak.py", "ws_bench.py", "observe_bench.py", "rate_limit_bench.py"]
