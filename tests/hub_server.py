"""A Hub on 127.0.0.1 for tests: the calls huggingface_hub makes to create a repo, commit files to it (as
"regular" files, their content inline) and download them (`snapshot_download`, `hf_hub_download`).

    with HubServer() as hub:                       # hub.endpoint: "http://127.0.0.1:<port>"
        ...                                        # HF_ENDPOINT=hub.endpoint
        hub.repos["org/name"]                      # {path: bytes}: what was pushed

It answers only on the loopback interface, keeps everything in memory and
stops with the `with` block.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import urllib.parse


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, kind="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, value, status=200, headers=None):
                self._send(status, json.dumps(value).encode(), headers)

            def _missing(self, code="RepoNotFound"):
                self._json({"error": "not found"}, 404, {"X-Error-Code": code, "X-Error-Message": "not found"})

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_POST(self):  # noqa: N802
                path = urllib.parse.urlparse(self.path).path
                hub.requests.append(f"POST {path}")
                body = self._body()
                if path == "/api/repos/create":
                    spec = json.loads(body)
                    repo = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                    hub.repos.setdefault(repo, {})
                    return self._json({"url": f"{hub.endpoint}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._json({"errors": [], "warnings": []})
                parts = path.split("/")  # /api/models/<org>/<name>/(preupload|commit)/<revision>
                if len(parts) >= 7 and parts[1:3] == ["api", "models"]:
                    repo, action = f"{parts[3]}/{parts[4]}", parts[5]
                    if repo not in hub.repos:
                        return self._missing()
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                     for f in files]})
                    if action == "commit":
                        for line in body.splitlines():
                            item = json.loads(line)
                            if item["key"] == "file":
                                value = item["value"]
                                hub.repos[repo][value["path"]] = base64.b64decode(value["content"])
                        sha = hashlib.sha1(json.dumps(sorted(hub.repos[repo])).encode() + body).hexdigest()
                        hub.commits[repo] = sha
                        return self._json({"commitUrl": f"{hub.endpoint}/{repo}/commit/{sha}", "commitOid": sha})
                return self._missing("EntryNotFound")

            def do_GET(self):  # noqa: N802
                path = urllib.parse.urlparse(self.path).path
                hub.requests.append(f"{self.command} {path}")
                parts = path.split("/")
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "revision":
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self._missing()
                    return self._json({"id": repo, "modelId": repo, "sha": hub.commits.get(repo, "0" * 40),
                                       "siblings": [{"rfilename": name} for name in sorted(hub.repos[repo])]})
                if len(parts) >= 7 and parts[1:3] == ["api", "models"] and parts[5] == "tree":
                    repo = f"{parts[3]}/{parts[4]}"
                    if repo not in hub.repos:
                        return self._missing()
                    return self._json([{"type": "file", "path": name, "size": len(data),
                                        "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
                                       for name, data in sorted(hub.repos[repo].items())])
                if len(parts) >= 6 and parts[3] == "resolve":  # /<org>/<name>/resolve/<revision>/<file>
                    repo, name = f"{parts[1]}/{parts[2]}", "/".join(parts[5:])
                    if repo not in hub.repos:
                        return self._missing()
                    if name not in hub.repos[repo]:
                        return self._missing("EntryNotFound")
                    data = hub.repos[repo][name]
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, {"ETag": f'"{etag}"', "X-Repo-Commit": hub.commits.get(repo, "0" * 40)},
                                      kind="application/octet-stream")
                return self._missing("EntryNotFound")

            do_HEAD = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
