"""A local HTTP server that speaks the Hugging Face Hub's file protocol, for tests.

It serves checkpoint folders as model repos the way huggingface_hub asks for them (set
HF_ENDPOINT to ``hub.url``): ``GET /api/models/{org}/{name}[/revision/{rev}]`` answers the repo
info (commit sha and file list), ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{file}`` a file with
the headers huggingface_hub reads (X-Repo-Commit, ETag, Content-Length), and
``GET /api/models/{org}/{name}/tree/{rev}`` the file list with sizes (one page). Unknown repos
get 401 with ``X-Error-Code: RepoNotFound`` (as the Hub answers), unknown revisions 404
``RevisionNotFound``. Every request
path and its Authorization header are recorded. Never the internet.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class LocalHub:
    repos: dict[str, Path]
    """repo id -> folder whose files the repo holds (revision "main" only)."""
    url: str = ""
    requests: list[tuple[str, str, str]] = field(default_factory=list)
    """(method, path, Authorization header) of every request, in order."""

    def sha(self, repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def files(self, repo_id: str) -> list[Path]:
        root = self.repos[repo_id]
        return sorted(p for p in root.rglob("*") if p.is_file())


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:  # quiet test output
            pass

        def _fail(self, code: str, status: int = 404) -> None:
            body = json.dumps({"error": code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _route(self) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Authorization", "")))
            parts = [p for p in path.split("/") if p]
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                return self._tree("/".join(parts[2:4]), parts[5])
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                revision = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
                return self._info(repo_id, revision)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = "/".join(parts[:2])
                return self._file(repo_id, parts[3], "/".join(parts[4:]))
            return self._fail("EntryNotFound")

        def _info(self, repo_id: str, revision: str) -> None:
            if repo_id not in hub.repos:
                return self._fail("RepoNotFound", 401)
            if revision not in ("main", hub.sha(repo_id)):
                return self._fail("RevisionNotFound")
            root = hub.repos[repo_id]
            body = json.dumps({
                "id": repo_id, "modelId": repo_id, "sha": hub.sha(repo_id), "private": False,
                "siblings": [{"rfilename": str(p.relative_to(root)), "size": p.stat().st_size}
                             for p in hub.files(repo_id)],
            }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _tree(self, repo_id: str, revision: str) -> None:
            if repo_id not in hub.repos:
                return self._fail("RepoNotFound", 401)
            if revision not in ("main", hub.sha(repo_id)):
                return self._fail("RevisionNotFound")
            root = hub.repos[repo_id]
            body = json.dumps([
                {"type": "file", "path": str(p.relative_to(root)), "size": p.stat().st_size,
                 "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                for p in hub.files(repo_id)]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, repo_id: str, revision: str, name: str) -> None:
            if repo_id not in hub.repos:
                return self._fail("RepoNotFound", 401)
            if revision not in ("main", hub.sha(repo_id)):
                return self._fail("RevisionNotFound")
            path = hub.repos[repo_id] / name
            if not path.is_file():
                return self._fail("EntryNotFound")
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", hub.sha(repo_id))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = _route
        do_HEAD = _route

    return Handler


@contextmanager
def serve_hub(repos: dict[str, Path]) -> Iterator[LocalHub]:
    """Serve ``repos`` on 127.0.0.1 (a free port) in a thread until the block ends."""
    hub = LocalHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
