"""Locust clients for benchmarks/loadtest.py: each posts one test-split text at a time to /predict, no pause.

Only against 127.0.0.1, and bounded: the run stops by itself after --run-time or GOEMO_LOAD_MAX_REQUESTS requests.
"""

import os
import random
from urllib.parse import urlparse

from locust import FastHttpUser, constant, events, task

TEXTS_FILE = os.environ.get("GOEMO_LOAD_TEXTS", "")
TEXTS = [line for line in open(TEXTS_FILE, encoding="utf-8").read().splitlines() if line] if TEXTS_FILE else ["I love it"]
MAX_REQUESTS = int(os.environ.get("GOEMO_LOAD_MAX_REQUESTS", "200000"))


@events.test_start.add_listener
def loopback_only(environment, **kwargs):
    host = urlparse(environment.host or "").hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"error: the load test runs only against 127.0.0.1, not {host}")


@events.request.add_listener
def bounded(context, **kwargs):
    runner = events_runner[0]
    if runner is not None and runner.stats.total.num_requests >= MAX_REQUESTS:
        runner.quit()


events_runner = [None]


@events.init.add_listener
def keep_runner(environment, **kwargs):
    events_runner[0] = environment.runner


class Client(FastHttpUser):
    # FastHttpUser (geventhttpclient) spends several times less CPU per request than HttpUser (requests): the
    # clients run on the server's own cores here, and what they spend is taken from the server.
    wait_time = constant(0)

    @task
    def predict(self):
        self.client.post("/predict", json={"text": random.choice(TEXTS)})
