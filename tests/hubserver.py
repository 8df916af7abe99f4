"""A small Hugging Face hub on 127.0.0.1 for tests: the HTTP layout `huggingface_hub`'s
`hf_hub_download` / `get_hf_file_metadata` use, served from files the test adds.

- ``HEAD/GET /{repo_id}/resolve/{revision}/{filename}`` (revision: a branch name the repo has
  or its commit) answers like the hub does for LFS files: ``302`` to an absolute CDN url with
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``, ``ETag``; a missing
  file is ``404`` with ``X-Error-Code: EntryNotFound``, an unknown repo ``RepoNotFound``.
- ``GET /cdn/{sha256}`` sends the bytes (``Range: bytes=N-`` -> ``206``), and may be told to
  cut the connection half-way (`cut_next`) and then to fail for a while (`fail_next`).
- every request is logged (method, path, Range header); anything else is a plain ``404``.

Bounded: the server thread stops on `stop()`, sockets time out after `SOCKET_TIMEOUT` s,
and after `MAX_REQUESTS` requests every answer is a ``500`` (a runaway client can't loop).
It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SOCKET_TIMEOUT = 10.0
MAX_REQUESTS = 300
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")


@dataclass
class HubFile:
    data: bytes
    sha256: str
    """The sha256 the hub advertises (normally that of `data`)."""


@dataclass
class Repo:
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)


class FakeHub:
    """Repos of files served over HTTP; `url` is the endpoint to give huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []
        self.cut_next = 0
        """Number of coming CDN GETs to cut after half of the requested bytes."""
        self.fail_next = 0
        """Number of coming CDN GETs (after the cut ones) to answer with 503."""
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []  # the hub, its CDN (another origin)
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ content
    def add(
        self, repo_id: str, filename: str, data: bytes, *, advertised_sha256: str | None = None
    ) -> HubFile:
        """Serve `data` as repo_id/filename (the repo's commit: a hash of its name)."""
        repo = self.repos.setdefault(repo_id, Repo(hashlib.sha1(repo_id.encode()).hexdigest()))
        f = HubFile(data, advertised_sha256 or hashlib.sha256(data).hexdigest())
        repo.files[filename] = f
        return f

    def requests(self, method: str | None = None, prefix: str = "") -> list[tuple]:
        with self._lock:
            return [
                r
                for r in self.log
                if (method is None or r[0] == method) and r[1].startswith(prefix)
            ]

    # ------------------------------------------------------------ serving
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        """The CDN: another port, so another origin (huggingface_hub doesn't follow it on HEAD)."""
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = SOCKET_TIMEOUT

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, body=False)

            def do_GET(self) -> None:
                hub._handle(self, body=True)

        for _ in range(2):
            srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
            srv.daemon_threads = True
            t = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            t.start()
            self._servers.append(srv)
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv, t in zip(self._servers, self._threads, strict=True):
            srv.shutdown()
            srv.server_close()
            t.join(timeout=5)
        self._servers, self._threads = [], []

    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        with self._lock:
            self.log.append((h.command, h.path, h.headers.get("Range")))
            runaway = len(self.log) > MAX_REQUESTS
        if runaway:
            return self._plain(h, 500)
        if m := _RESOLVE.match(h.path):
            return self._resolve(h, m["repo"], m["rev"], m["file"])
        if (m := _CDN.match(h.path)) and h.command == "GET":
            return self._cdn(h, m["sha"])
        return self._plain(h, 404)

    def _plain(self, h: BaseHTTPRequestHandler, status: int, headers: dict | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _resolve(self, h: BaseHTTPRequestHandler, repo_id: str, rev: str, fname: str) -> None:
        repo = self.repos.get(repo_id)
        if repo is None or rev not in ("main", repo.commit):
            code = "RepoNotFound" if repo is None else "RevisionNotFound"
            return self._plain(h, 404, {"X-Error-Code": code, "X-Error-Message": code})
        f = repo.files.get(fname)
        if f is None:
            return self._plain(
                h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}
            )
        self._plain(
            h,
            302,
            {
                "Location": f"{self.cdn_url}/cdn/{f.sha256}",
                "X-Repo-Commit": repo.commit,
                "X-Linked-Etag": f'"{f.sha256}"',
                "X-Linked-Size": str(len(f.data)),
                "ETag": f'"{hashlib.sha1(f.data).hexdigest()}"',
            },
        )

    def _cdn(self, h: BaseHTTPRequestHandler, sha: str) -> None:
        data = next(
            (f.data for r in self.repos.values() for f in r.files.values() if f.sha256 == sha),
            None,
        )
        if data is None:
            return self._plain(h, 404)
        with self._lock:
            cut, self.cut_next = self.cut_next > 0, max(0, self.cut_next - 1)
            failing = not cut and self.fail_next > 0
            if failing:
                self.fail_next -= 1
        if failing:
            return self._plain(h, 503)
        start = 0
        rng = h.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d+)-", rng.strip())):
            start = int(m[1])
        if start > len(data):
            return self._plain(h, 416, {"Content-Range": f"bytes */{len(data)}"})
        part = data[start:]
        h.send_response(206 if start else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(part)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("ETag", f'"{sha}"')
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if cut:  # half of what was asked, then the connection goes away
            h.wfile.write(part[: len(part) // 2])
            h.wfile.flush()
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        h.wfile.write(part)


def blackhole() -> tuple[socket.socket, str]:
    """A listening socket on 127.0.0.1 that never answers (connections hang): (socket, url)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, f"http://127.0.0.1:{s.getsockname()[1]}"


def closed_port_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def point_hub_at(monkeypatch, endpoint: str, cache_dir, *, offline: bool = False) -> None:
    """Make huggingface_hub (already imported) use `endpoint` and `cache_dir`, online or not,
    as it would had HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE been set before its import."""
    from huggingface_hub import constants

    home = str(cache_dir.parent / "hf_home")
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": home, "HF_HUB_CACHE": str(cache_dir),
           "HF_HUB_DISABLE_TELEMETRY": "1"}  # fmt: skip
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HOME", home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir.parent / "no-token"))
