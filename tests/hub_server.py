"""A Hugging Face Hub stand-in on the loopback address, for the real huggingface_hub client.

It serves what a start asks of the Hub: `api/models/<repo>/revision/<rev>` (the commit and the
file list), `api/models/<repo>/tree/<rev>` (files with sizes), and `<repo>/resolve/<rev>/<file>`
with HEAD, GET and byte ranges. Repos are folders of files, pushed as commits; a branch can be
moved while a test runs. Every request is counted, so tests can say what was fetched and how often.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import http.server
import json
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit


class Repo:
    """Commits (hash -> {file name: bytes}) and refs (branch -> commit hash)."""

    def __init__(self) -> None:
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def push(self, files: dict[str, bytes], branch: str = "main") -> str:
        """Add a commit of `files` and point `branch` at it; its hash."""
        digest = hashlib.sha1(repr(sorted((k, hashlib.sha1(v).hexdigest()) for k, v in files.items())).encode())
        digest.update(str(len(self.commits)).encode())
        commit = digest.hexdigest()
        self.commits[commit] = dict(files)
        self.refs[branch] = commit
        return commit

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def folder_files(folder: Path) -> dict[str, bytes]:
    """A checkpoint folder's files, by name, as a commit's contents."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


class HubServer:
    """The stand-in: `with HubServer() as hub:` serves at `hub.url` until the block ends."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = collections.defaultdict(Repo)
        self.requests: list[tuple[str, str]] = []
        """(method, path) of every request served, in order."""
        self.on_revision: Callable[[str, str], None] | None = None
        """Called with (repo id, revision) after each revision lookup has been answered."""
        self._lock = threading.Lock()
        self._connections: set = set()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: connections to the port are refused from now on."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:  # and the kept-alive connections a client still holds
            for connection in self._connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self._connections.clear()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, method: str, pattern: str) -> int:
        """How many requests of `method` had a path matching the regex `pattern`."""
        with self._lock:
            return sum(1 for m, p in self.requests if m == method and re.search(pattern, p))

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server_hub._lock:
            self.server_hub._connections.add(self.connection)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        hub = self.server_hub
        path = unquote(urlsplit(self.path).path)
        hub.record("HEAD" if head else "GET", path)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._revision(m[1], m[2] or "main")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
            return self._tree(m[1], m[2])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(m[1], m[2], m[3], head)
        self._error(404, "EntryNotFound", f"no route {path}")

    def _repo_commit(self, repo_id: str, revision: str) -> tuple[Repo, str] | None:
        if repo_id not in self.server_hub.repos:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            return None
        repo = self.server_hub.repos[repo_id]
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _revision(self, repo_id: str, revision: str) -> None:
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        siblings = [{"rfilename": name} for name in sorted(repo.commits[commit])]
        self._json({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings})
        if self.server_hub.on_revision is not None:
            self.server_hub.on_revision(repo_id, revision)

    def _tree(self, repo_id: str, revision: str) -> None:
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(repo.commits[commit].items())
        ]
        self._json(entries)

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        found = self._repo_commit(repo_id, revision)
        if found is None:
            return
        repo, commit = found
        data = repo.commits[commit].get(name)
        if data is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {commit}")
        start, end, status = 0, len(data), 200
        if (rng := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())):
            start = int(m[1])
            end = int(m[2]) + 1 if m[2] else len(data)
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{_etag(data)}"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class DroppingListener:
    """A Hub that has gone wrong on `port`: every connection is accepted and closed at once, and
    counted, so a test can tell how often a client tried (retries, backoff) without timing it."""

    def __init__(self, port: int) -> None:
        self.attempts = 0
        self._socket = socket.create_server(("127.0.0.1", port))
        self._socket.settimeout(0.1)
        self._running = True
        self._thread = threading.Thread(target=self._serve, name="hub-dropping", daemon=True)

    def _serve(self) -> None:
        while self._running:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            self.attempts += 1
            connection.close()

    def __enter__(self) -> DroppingListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join()
        self._socket.close()
