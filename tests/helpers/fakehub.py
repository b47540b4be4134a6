"""A tiny stand-in for the Hugging Face hub on 127.0.0.1: the endpoints snapshot_download calls.

It serves one directory as repository ``repo`` at one commit: the repo info, the
file tree, and ``resolve`` downloads (HEAD with the metadata headers, GET with the
bytes). Point ``HF_ENDPOINT`` at ``url``; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

__all__ = ["FakeHub"]

COMMIT = "a" * 40


class FakeHub:
    def __init__(self, root: Path, repo: str) -> None:
        self.root = Path(root)
        self.repo = repo
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.is_file())

    def _serve(self, request: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = unquote(urlparse(request.path).path)
        self.requests.append(f"{request.command} {path}")
        api = f"/api/models/{self.repo}"
        if path in (api, f"{api}/revision/main", f"{api}/revision/{COMMIT}"):
            body = {"id": self.repo, "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in self._files()]}
            return self._send(request, json.dumps(body).encode(), "application/json", head)
        if path.startswith(f"{api}/tree/"):
            body = [{"type": "file", "oid": hashlib.sha1(p.read_bytes()).hexdigest(), "size": p.stat().st_size,
                     "path": p.name} for p in self._files()]
            return self._send(request, json.dumps(body).encode(), "application/json", head)
        prefix = f"/{self.repo}/resolve/"
        if path.startswith(prefix):
            name = path[len(prefix):].split("/", 1)[1]
            file = self.root / name
            if file.is_file() and file.parent == self.root:
                data = file.read_bytes()
                return self._send(request, data, "application/octet-stream", head, extra={
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"', "X-Repo-Commit": COMMIT})
        request.send_response(404)
        request.send_header("Content-Length", "0")
        request.send_header("X-Error-Code", "EntryNotFound")
        request.end_headers()

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, data: bytes, kind: str, head: bool,
              extra: dict[str, str] | None = None) -> None:
        request.send_response(200)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(data)))
        for k, v in (extra or {}).items():
            request.send_header(k, v)
        request.end_headers()
        if not head:
            request.wfile.write(data)
