"""push_to_hub: the export (weights, tokenizer, model card) is uploaded through huggingface_hub to a local stub of
the Hub's HTTP API (repository creation, pre-upload, commit), which keeps what it receives; a failed push is one
line, and the export stays."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from iopo.cli import main

from tiny import run_overrides, write_pairs


class StubHub(BaseHTTPRequestHandler):
    """The calls an upload makes: POST /api/repos/create, /api/validate-yaml (the model card), /api/models/<id>/
    preupload/<rev> (every file a regular git blob, so it comes inline), /api/models/<id>/commit/<rev> (NDJSON: a
    header, then the base64 files)."""

    received: dict = {}
    fail = False

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.fail:
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        if self.path.startswith("/api/repos/create"):
            request = json.loads(body)
            repo = f"{request.get('organization') or 'user'}/{request['name']}"
            private = request.get("visibility") == "private" or request.get("private") is True
            self.received["created"] = {"repo": repo, "private": private}
            return self._reply(
                200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo, "id": repo}
            )
        if self.path.startswith("/api/validate-yaml"):  # the model card's metadata, checked before the upload
            self.received["card_metadata"] = json.loads(body)
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in self.path:
            lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
            self.received["header"] = next(x["value"] for x in lines if x["key"] == "header")
            self.received["files"] = {
                x["value"]["path"]: base64.b64decode(x["value"]["content"])
                for x in lines
                if x["key"] == "file"
            }
            self.received["repo_path"] = self.path
            url = f"http://{self.headers['Host']}/{self.received['created']['repo']}/commit/{'1' * 40}"
            return self._reply(200, {"commitUrl": url, "commitOid": "1" * 40})
        return self._reply(404, {"error": f"not stubbed: {self.path}"})


@pytest.fixture()
def hub(monkeypatch):
    StubHub.received, StubHub.fail = {}, False
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("HF_TOKEN", "hf_stub_token")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield StubHub
    server.shutdown()


def test_a_training_run_pushes_its_export_to_the_hub(tmp_path, tiny_model_dir, hub, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", n=24)
    run = tmp_path / "run"
    args = run_overrides(tiny_model_dir, data, run, "method=dpo", "optim.max_steps=2")
    assert main(["train", *args, "push_to_hub=true", "hub_model_id=my-org/tiny-dpo"]) == 0
    assert hub.received["created"] == {"repo": "my-org/tiny-dpo", "private": True}
    assert "my-org/tiny-dpo" in hub.received["repo_path"]
    assert hub.received["header"]["summary"] == "iopo dpo: run"
    final = run / "final"
    sent = hub.received["files"]
    local = {p.relative_to(final).as_posix(): p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert sent == local  # every file of the export, byte for byte
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(sent)

    # a refused push: one line, the export kept, the command says how to push it by hand
    hub.fail = True
    capsys.readouterr()
    again = run_overrides(tiny_model_dir, data, tmp_path / "run2", "method=dpo", "optim.max_steps=2")
    assert main(["train", *again, "push_to_hub=true", "hub_model_id=my-org/tiny-dpo"]) == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("iopo: error:")]
    assert len(said) == 1 and "my-org/tiny-dpo failed" in said[0] and "huggingface-cli upload" in said[0]
    assert "Traceback" not in err
    assert (tmp_path / "run2" / "final" / "model.safetensors").is_file()
