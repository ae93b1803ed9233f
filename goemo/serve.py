"""`python -m goemo.serve RUN [--port 8000]`: a trained run behind HTTP, on LitServe, with dynamic batching.

    curl -s localhost:8000/predict -H 'Content-Type: application/json' -d '{"text": "I love it"}'
    curl -s localhost:8000/predict -H 'Content-Type: application/json' -d '{"texts": ["I love it", "ugh"]}'

`POST /predict` takes `{"text": "..."}` (answered with one record) or `{"texts": [...]}` (a list of records), the
records `goemo.load(RUN).predict` returns; `GET /health` says "ok" once the model is loaded. Requests are checked
in the HTTP server before they join a batch, so a bad one gets its own 4xx JSON error, `{"error": "one line"}`,
and never fails the requests batched with it: 400 for a body that is not JSON, a missing or non-string text, an
empty list, unknown fields or invalid Unicode; 413 for more than `--max-texts` texts, a text longer than
`--max-chars` characters, or a body over `--max-body` bytes; 415 for a body sent as another type than JSON
(`curl -d` without the Content-Type header sends a form's). Requests that arrive within `--batch-timeout` seconds
of each other are predicted in one forward pass, up to `--max-batch` requests (LitServe's batching queue).
"""


# No `from __future__ import annotations` here: LitServe reads decode_request's annotation as the request type.
import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Any, Optional

try:
    import litserve as ls
    from pydantic import BaseModel, ConfigDict, model_validator
except ImportError as e:  # `python -m goemo.serve` without the extra: one line, not this import's traceback
    from goemo.errors import GoemoError, exit_on_error

    with exit_on_error() if __name__ == "__main__" else contextlib.nullcontext():
        raise GoemoError(f"goemo.serve needs LitServe ({e.name or e} is not installed): pip install -e '.[serve]'") from None

# The request limits, as environment variables: `main` sets them, and the HTTP server processes it starts inherit them.
MAX_TEXTS, MAX_CHARS = "GOEMO_SERVE_MAX_TEXTS", "GOEMO_SERVE_MAX_CHARS"


REQUEST_TIMEOUT = 60  # seconds a request waits for its answer (LitServer's timeout)
LISTEN_HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # the hosts LitServer.run listens on (litserve 0.2)


def limits() -> tuple[int, int]:
    return int(os.environ.get(MAX_TEXTS, 1000)), int(os.environ.get(MAX_CHARS, 10_000))


class PredictRequest(BaseModel):
    """The body of `POST /predict`: exactly one of `text` and `texts`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Optional[str] = None
    texts: Optional[list[str]] = None

    @model_validator(mode="after")
    def _check(self) -> "PredictRequest":
        if (self.text is None) == (self.texts is None):
            raise ValueError('give exactly one of "text" (a string) or "texts" (a list of strings)')
        texts = [self.text] if self.text is not None else self.texts
        max_texts, max_chars = limits()
        if not texts:
            raise ValueError('"texts" is empty: give at least one text')
        if len(texts) > max_texts:
            raise ValueError(f"too many texts: {len(texts)} (at most {max_texts} a request)")
        for i, t in enumerate(texts):
            if len(t) > max_chars:
                raise ValueError(f"too long: text {i} has {len(t)} characters (at most {max_chars})")
            if not t.isascii():
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"text {i} is not valid Unicode (a lone surrogate escape)") from None
        return self


class GoemoAPI(ls.LitAPI):
    def __init__(self, run: str, backend: str = "torch", max_batch: int = 32, batch_timeout: float = 0.01,
                 stats: Optional[str] = None) -> None:
        """Requests (lists of texts) batched together and predicted in one call of the classifier.

        Args:
            run: What `goemo.load` loads.
            backend: torch, onnx or int8.
            max_batch: Requests predicted together at most (1: batching off).
            batch_timeout: Seconds a batch waits for more requests.
            stats: If set, a file that gets a line `requests texts` per forward call.
        """
        super().__init__(max_batch_size=max_batch, batch_timeout=batch_timeout)
        self.run, self.backend, self.stats = run, backend, stats

    def setup(self, device: str) -> None:
        from goemo import load

        self.clf = load(self.run, backend=self.backend)
        self.clf.predict(["warm-up"])  # the first forward pass pays for lazy initialisation, not a client

    def decode_request(self, request: PredictRequest) -> tuple[list[str], bool]:
        return ([request.text], True) if request.text is not None else (list(request.texts), False)

    def batch(self, inputs: list) -> list:
        return inputs

    def predict(self, inputs: list) -> list:
        single_request = self.max_batch_size == 1  # LitServe then calls predict per request, without batch()
        if single_request:
            inputs = [inputs]
        texts = [t for batch, _ in inputs for t in batch]
        records = self.clf.predict(texts)  # one call: length-sorted batches over all the requests' texts
        if self.stats:
            with open(self.stats, "a", encoding="utf-8") as f:
                f.write(f"{len(inputs)} {len(texts)}\n")
        out, start = [], 0
        for batch, single in inputs:
            part = records[start : start + len(batch)]
            out.append(part[0] if single else part)
            start += len(batch)
        return out[0] if single_request else out

    def unbatch(self, output: list) -> list:
        return output

    def encode_response(self, output: Any) -> Any:
        return output


def one_line_errors(app, max_body: int) -> None:
    """FastAPI's validation errors (a list of dicts, 422) as `{"error": "one line"}` with 400, 413 or 415, and the HTTP
    errors LitServe raises (`{"detail": ...}`: a body over `max_body` bytes, 413) as `{"error": "one line"}` too."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        message = f"the body is over {max_body} bytes (--max-body)" if exc.status_code == 413 else " ".join(str(exc.detail).split())
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(HTTPException, http_error)

    async def handler(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if isinstance(first.get("input"), bytes):  # FastAPI parses a body as JSON only when it is sent as JSON
            ctype = (request.headers.get("content-type") or "").split(";")[0].strip()
            sent = f"as {ctype}" if ctype else "without a Content-Type"  # curl -d sends a form's
            return JSONResponse({"error": f"the body is sent {sent}: send JSON with the header "
                                          "Content-Type: application/json"}, status_code=415)  # fmt: skip
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
        cause = (first.get("ctx") or {}).get("error")
        message = str(cause) if cause else f"{'.'.join(str(x) for x in first.get('loc', ())[1:]) or 'body'}: {first.get('msg', 'invalid')}"
        code = 413 if message.startswith(("too many", "too long")) else 400
        return JSONResponse({"error": " ".join(message.split())}, status_code=code)

    app.add_exception_handler(RequestValidationError, handler)


def check_address(host: str, port: int) -> None:
    """One line now if the server could not listen on host:port, rather than LitServe's or uvicorn's error once the
    model has loaded (minutes for a large one). Another process may still take the port in between: uvicorn's error then."""
    from goemo.errors import GoemoError

    if host not in LISTEN_HOSTS:  # LitServer.run refuses any other (a name, a LAN address, ::1)
        raise GoemoError(f"--host must be one of {', '.join(LISTEN_HOSTS)} (every interface: 0.0.0.0 or ::), got {host!r}")
    if not 1024 <= port <= 65535:  # LitServer.run's range
        raise GoemoError(f"--port must be within 1024..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:  # the socket too: on a machine with IPv6 off, `::` fails there (EAFNOSUPPORT)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            what = "stop what holds the port or pick another --port"
        elif isinstance(e, PermissionError) or e.errno in (errno.EACCES, 10013):  # 10013: Windows' WSAEACCES
            # a port reserved here (Windows' excluded ranges, SELinux port labels, a raised unprivileged start)
            what = "this machine does not let goemo listen on that port; pick another --port"
        else:  # IPv6 off (EAFNOSUPPORT), an address not on this machine
            what = "this machine cannot listen there; pick another --host"
        raise GoemoError(f"cannot listen on {host} port {port} ({e.strerror}); {what}") from None


def main(argv: Optional[list[str]] = None) -> None:
    from goemo.errors import ArgumentParser

    p = ArgumentParser(prog="python -m goemo.serve", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder, .ckpt file, best, last or an ensemble folder (as goemo.load takes)")
    p.add_argument("--port", type=int, default=8000, help="1024..65535")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on: 127.0.0.1 (this machine), 0.0.0.0 or :: (every interface)")
    p.add_argument("--backend", choices=("torch", "onnx", "int8"), default="torch", help="what runs the model (see goemo.load)")
    p.add_argument("--max-batch", type=int, default=32, help="requests predicted together at most (1: batching off)")
    p.add_argument("--batch-timeout", type=float, default=0.01, help="seconds a batch waits for more requests (0 to under 60)")
    p.add_argument("--max-texts", type=int, default=1000, help="texts a request may hold")
    p.add_argument("--max-chars", type=int, default=10_000, help="characters a text may have")
    p.add_argument("--max-body", type=int, default=2_000_000, help="largest request body in bytes (413 above it)")
    p.add_argument("--stats", default=None, help="append 'requests texts' per forward call to this file")
    p.add_argument("--fast-queue", action="store_true", help="answers go back over ZeroMQ (LitServe's fast_queue; not on Windows)")
    p.add_argument("--api-servers", type=int, default=1, help="HTTP server processes in front of the model worker (LitServe's num_api_servers)")
    a = p.parse_args(argv)
    from goemo.errors import GoemoError, exit_on_error
    from goemo.files import check_output_file

    with exit_on_error():  # a bad flag or a run that does not load is one line, before any worker starts
        from goemo import load

        for flag, value in (("--api-servers", a.api_servers), ("--max-batch", a.max_batch), ("--max-texts", a.max_texts),
                            ("--max-chars", a.max_chars), ("--max-body", a.max_body)):  # fmt: skip
            if value < 1:
                raise GoemoError(f"{flag} must be at least 1, got {value}")
        # LitServer refuses a batch timeout over the request timeout; goemo also refuses one equal to it, with which a
        # request could wait its whole time for its batch.
        if not 0 <= a.batch_timeout < REQUEST_TIMEOUT:
            raise GoemoError(f"--batch-timeout must be at least 0 and under {REQUEST_TIMEOUT} seconds (a request's time "
                             f"to its answer), got {a.batch_timeout}")  # fmt: skip
        check_address(a.host, a.port)
        if a.stats:  # checked here: a stats file that cannot be written failed every request with a 500
            check_output_file(Path(a.stats), "--stats", "stats.txt")
        # Loaded once here, and again in LitServe's worker: an error there is two tracebacks and a stop minutes later.
        load(a.run, backend=a.backend)
    os.environ[MAX_TEXTS], os.environ[MAX_CHARS] = str(a.max_texts), str(a.max_chars)
    api = GoemoAPI(a.run, a.backend, a.max_batch, a.batch_timeout, a.stats)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, max_payload_size=a.max_body, timeout=REQUEST_TIMEOUT,
                          fast_queue=a.fast_queue)
    one_line_errors(server.app, a.max_body)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    server.run(host=a.host, port=a.port, num_api_servers=a.api_servers, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
