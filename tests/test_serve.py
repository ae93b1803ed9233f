"""`python -m goemo.serve`: answers as goemo.load predicts, batches concurrent requests, refuses bad ones with a 4xx."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 60, content_type: str = "application/json") -> tuple[int, object]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module", params=[[], ["--fast-queue", "--api-servers", "2"]], ids=["default", "fast-queue-2-api-servers"])
def server(learned_run, tmp_path_factory, request):
    """The learned tiny run (its scores differ between texts) served on a free port, batching up to 64 requests that come within 0.5 s; answers go back over
    LitServe's multiprocessing queues, then (`--fast-queue`) over ZeroMQ from two HTTP server processes."""
    stats = tmp_path_factory.mktemp("serve") / "stats.txt"
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "goemo.serve", str(learned_run / "lightning_logs/version_0"), "--port", str(port),
                             "--max-batch", "64", "--batch-timeout", "0.5", "--max-texts", "100", "--max-chars", "5000",
                             "--stats", str(stats), *request.param], cwd=learned_run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.read().decode().strip('"') == "ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < end, "the server did not come up"
            time.sleep(0.3)
        yield url, stats
    finally:  # also when it never came up: no server or worker process outlives the tests
        proc.send_signal(signal.SIGINT)  # as Ctrl-C; then the whole group (LitServe's worker processes) if it lingers
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_server_answers_as_load_predicts(server, learned_run):
    from goemo import load

    url, _ = server
    texts = ["I am so happy and glad", "angry mad"]
    want = load(learned_run / "lightning_logs/version_0").predict(texts)
    assert max(abs(want[0]["scores"][k] - want[1]["scores"][k]) for k in want[0]["scores"]) > 0.01  # answers to tell apart
    status, one = post(url + "/predict", json.dumps({"text": texts[0]}).encode())
    assert status == 200 and one["text"] == want[0]["text"] and one["labels"] == want[0]["labels"]
    assert one["scores"] == pytest.approx(want[0]["scores"], abs=1e-5)
    status, many = post(url + "/predict", json.dumps({"texts": texts}).encode())
    assert status == 200 and [r["text"] for r in many] == texts and [r["labels"] for r in many] == [w["labels"] for w in want]
    assert [r["scores"] for r in many] == [pytest.approx(w["scores"], abs=1e-5) for w in want]  # in the order asked


@pytest.mark.slow
def test_concurrent_requests_share_forward_passes(server):
    url, stats = server
    stats.write_text("")
    texts = [f"happy glad {i}" for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda t: post(url + "/predict", json.dumps({"text": t}).encode()), texts))
    assert all(status == 200 for status, _ in answers) and [a["text"] for _, a in answers] == texts
    calls = [tuple(map(int, line.split())) for line in stats.read_text().splitlines()]
    assert sum(r for r, _ in calls) == 24 and len(calls) < 24  # fewer forward calls than requests


@pytest.mark.slow
@pytest.mark.parametrize(
    "body,status,message",
    [
        (b"not json", 400, "the body is not valid JSON"),
        (b"{}", 400, 'give exactly one of "text"'),
        (b'{"text": 5}', 400, "text: Input should be a valid string"),
        (b'{"texts": ["ok", 5]}', 400, "texts.1: Input should be a valid string"),
        (b'{"texts": []}', 400, '"texts" is empty'),
        (b'{"text": "a", "texts": ["b"]}', 400, "give exactly one of"),
        (b'{"text": "a", "extra": 1}', 400, "extra: Extra inputs are not permitted"),
        (b'{"text": "\\ud800"}', 400, "not valid Unicode"),
        (json.dumps({"texts": ["x"] * 100_000}).encode(), 413, "too many texts: 100000 (at most 100 a request)"),
        (json.dumps({"text": "x" * 6000}).encode(), 413, "too long: text 0 has 6000 characters (at most 5000)"),
        (json.dumps({"text": "x" * 1_000_000}).encode(), 413, "too long: text 0 has 1000000 characters"),
        (json.dumps({"text": "x" * 2_100_000}).encode(), 413, "the body is over 2000000 bytes (--max-body)"),
    ],
)
def test_bad_requests_get_a_4xx_with_one_line(server, body, status, message):
    url, _ = server
    got, answer = post(url + "/predict", body)
    assert got == status, answer
    if message:
        assert isinstance(answer, dict) and message in answer["error"] and "\n" not in answer["error"]
    ok, _ = post(url + "/predict", b'{"text": "still fine"}')
    assert ok == 200  # the server goes on


def test_load_test_times_the_model_alone_one_text_a_call_and_grouped(tiny_run, monkeypatch):
    from benchmarks.loadtest import model_gain
    from goemo.classifier import Classifier

    texts = [f"text number {i} " * (1 + i % 5) for i in range(40)]
    sizes = []
    predict = Classifier.predict
    monkeypatch.setattr(Classifier, "predict", lambda self, texts: sizes.append(len(texts)) or predict(self, texts))
    g = model_gain(str(tiny_run / "lightning_logs/version_0"), "torch", texts, group=4, calls=8)
    assert sizes == [4] + [1] * 8 + [4] * 2  # the warm-up, one text a call, then groups of 4 (as many texts)
    assert g["backend"] == "torch" and g["group"] == 4
    assert g["single_ms_per_text"] > 0 and g["grouped_ms_per_text"] > 0
    assert g["gain"] == pytest.approx(g["single_ms_per_text"] / g["grouped_ms_per_text"], abs=0.01)


def test_load_test_memory_counts_pages_shared_by_a_forked_worker_once_in_pss():
    """The server's RSS summed over its processes counted the weights a forked worker shares with its parent twice."""
    from benchmarks.loadtest import tree_memory_mib

    code = ("import os, sys, time; a = bytearray(os.urandom(1 << 20)) * 160; os.fork(); "
            "os.write(1, b'ready\\n'); time.sleep(30)")  # 160 MiB written in the parent, shared after the fork
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline() == "ready\n" and proc.stdout.readline() == "ready\n"
        time.sleep(0.2)  # the child is listed in its parent's children
        rss, pss = tree_memory_mib(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert rss > 2 * 160 and pss < rss - 0.8 * 160  # both processes map the 160 MiB; PSS counts them once


def test_an_ensemble_folder_is_served_and_its_missing_member_is_one_line(tiny_run, tmp_path, monkeypatch, capsys):
    import shutil

    from goemo import serve
    from goemo.runs import load_checkpoint

    member = tmp_path / "member.ckpt"
    shutil.copy(tiny_run / "lightning_logs/version_0/checkpoints/last.ckpt", member)
    labels = load_checkpoint(member)["hyper_parameters"]["label_names"]
    ens = tmp_path / "ens"
    ens.mkdir()
    spec = {"members": [str(member)], "thresholds": [0.5] * len(labels), "labels": labels}
    (ens / "ensemble.json").write_text(json.dumps(spec))

    class Started(Exception):
        pass

    def api(run, *args):
        raise Started(run)  # past the checks: the server would start here, and goemo.load the ensemble

    monkeypatch.setattr(serve, "GoemoAPI", api)
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in (str(ens), "~/ens"):  # a folder as goemo.load takes it
        with pytest.raises(Started):
            serve.main([name])
    member.unlink()
    with pytest.raises(SystemExit) as e:
        serve.main([str(ens)])
    assert e.value.code == 2  # as every goemo command's one-line errors
    assert capsys.readouterr().err == f"error: ensemble {ens}: its member {member} is gone; restore it, or build the ensemble again\n"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-timeout", "-1"], "--batch-timeout must be at least 0 and under 60 seconds (a request's time to its answer), got -1.0"),
        (["--batch-timeout", "60"], "--batch-timeout must be at least 0 and under 60 seconds"),  # stricter than LitServer
        (["--batch-timeout", "nan"], "--batch-timeout must be at least 0 and under 60 seconds"),
        (["--api-servers", "0"], "--api-servers must be at least 1, got 0"),
        (["--port", "70000"], "--port must be within 1024..65535, got 70000"),
        (["--port", "80"], "--port must be within 1024..65535, got 80"),  # LitServe's range: bind would work as root
        (["--host", "localhost"], "--host must be one of 127.0.0.1, 0.0.0.0, :: (every interface: 0.0.0.0 or ::), got 'localhost'"),
        (["--max-texts", "0"], "--max-texts must be at least 1, got 0"),
        (["--max-chars", "-5"], "--max-chars must be at least 1, got -5"),
        (["--max-body", "0"], "--max-body must be at least 1, got 0"),
        (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
        (["--stats", "/proc/nope/s.txt"], "--stats /proc/nope/s.txt: its folder /proc/nope: cannot write there"),
    ],
)
def test_bad_flags_and_an_unloadable_model_are_one_line_before_any_worker(tmp_path, monkeypatch, capsys, flags, message):
    """A limit that refuses every request, or a checkpoint LitServe's worker cannot load (two tracebacks and exit 1,
    minutes later), stops at once with one line."""
    from goemo import serve

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(serve, "GoemoAPI", lambda *a: pytest.fail("the server started"))
    for argv, expected in (([str(junk), *flags], f"error: {message}"), ([str(junk)], f"error: {junk}: not a loadable checkpoint")):
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.slow
def test_requests_at_the_limits_pass_and_a_body_not_sent_as_json_says_so(server):
    url, _ = server
    assert post(url + "/predict", json.dumps({"texts": ["x"] * 100}).encode())[0] == 200  # --max-texts 100
    assert post(url + "/predict", json.dumps({"text": "x" * 5000}).encode())[0] == 200  # --max-chars 5000
    assert post(url + "/predict", json.dumps({"texts": ["x"] * 101}).encode())[0] == 413
    body = b'{"text": "I love it"}'
    got, answer = post(url + "/predict", body, content_type="application/json; charset=utf-8")
    assert got == 200 and answer["text"] == "I love it", answer
    import http.client  # no Content-Type at all (urllib would add a form's)

    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/predict", body=body)
    r = conn.getresponse()
    assert (r.status, json.loads(r.read())) == (415, {"error": "the body is sent without a Content-Type: send JSON "
                                                                "with the header Content-Type: application/json"})  # fmt: skip
    conn.close()
    for content_type, media in (("application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),  # curl -d's
                                ("text/plain; charset=utf-8", "text/plain")):  # fmt: skip
        got, answer = post(url + "/predict", body, content_type=content_type)
        assert (got, answer) == (415, {"error": f"the body is sent as {media}: send JSON with the header "
                                                "Content-Type: application/json"})  # fmt: skip


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """uvicorn's own error came after the model had loaded (minutes for a large one), and the process lingered."""
    import goemo.api  # (not goemo.load: undoing a patch of the lazy attribute would leave it a real one)
    from goemo import serve

    monkeypatch.setattr(goemo.api, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            serve.main([str(tmp_path / "run"), "--port", str(port)])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot listen on 127.0.0.1 port {port} (Address already in use); stop "
                                       "what holds the port or pick another --port\n")  # fmt: skip
    # a port just closed by a server (uvicorn's socket, SO_REUSEADDR, its connection in TIME_WAIT) is free, as
    # uvicorn binds it again
    from goemo.serve import check_address

    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()
        client.close()
    check_address("127.0.0.1", port)


def test_a_host_this_machine_cannot_listen_on_is_one_line(monkeypatch):
    """`::` on a machine with IPv6 off fails at the socket itself (EAFNOSUPPORT): it was a traceback."""
    import errno

    from goemo import serve
    from goemo.errors import GoemoError

    def no_ipv6(family, *a, **k):
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(serve.socket, "socket", no_ipv6)
    with pytest.raises(GoemoError) as e:
        serve.check_address("::", 8765)
    assert str(e.value) == ("cannot listen on :: port 8765 (Address family not supported by protocol); this machine "
                            "cannot listen there; pick another --host")  # fmt: skip


def test_check_address_opens_the_socket_family_of_its_host_and_takes_the_port_range_edges(monkeypatch):
    from goemo import serve
    from goemo.errors import GoemoError

    families = []

    class Recorder:
        def __init__(self, family, kind):
            families.append(family)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def setsockopt(self, *args):
            pass

        def bind(self, address):
            pass

    monkeypatch.setattr(serve.socket, "socket", Recorder)
    for host in ("::", "0.0.0.0", "127.0.0.1"):
        serve.check_address(host, 8765)
    assert families == [socket.AF_INET6, socket.AF_INET, socket.AF_INET]
    serve.check_address("127.0.0.1", 1024)  # LitServer.run's range, both ends
    serve.check_address("127.0.0.1", 65535)
    for port in (1023, 65536):
        with pytest.raises(GoemoError, match=f"^--port must be within 1024..65535, got {port}$"):
            serve.check_address("127.0.0.1", port)


def test_a_port_this_machine_reserves_says_pick_another_port(monkeypatch):
    """A forbidden port (EACCES: Windows' excluded ranges, SELinux port labels) is not fixed by another --host."""
    import errno

    from goemo import serve
    from goemo.errors import GoemoError

    def reserved(self, address):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(serve.socket.socket, "bind", reserved)
    with pytest.raises(GoemoError) as e:
        serve.check_address("0.0.0.0", 8000)
    assert str(e.value) == ("cannot listen on 0.0.0.0 port 8000 (Permission denied); this machine does not let goemo "
                            "listen on that port; pick another --port")  # fmt: skip

    def reserved_on_windows(self, address):  # WSAEACCES: Windows' excluded port ranges
        raise OSError(10013, "An attempt was made to access a socket in a way forbidden by its access permissions")

    monkeypatch.setattr(serve.socket.socket, "bind", reserved_on_windows)
    with pytest.raises(GoemoError, match="pick another --port$"):
        serve.check_address("0.0.0.0", 8000)


def test_serve_without_litserve_is_one_line(tmp_path):
    """litserve is imported at the module's top: without the extra, `python -m goemo.serve` was a traceback."""
    code = "import runpy, sys\nsys.modules['litserve'] = None\nrunpy.run_module('goemo.serve', run_name='__main__', alter_sys=True)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code, "run"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert (r.returncode, r.stderr) == (2, "error: goemo.serve needs LitServe (litserve is not installed): pip install -e '.[serve]'\n")
