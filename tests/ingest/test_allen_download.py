"""`python -m ingest allen`: clear failures, nothing partial, and a real allensdk download against a local fake Allen API."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest

from ingest.allen import main
from ingest.synth import synthesize
from tests.support import REPO

ALLEN_ENV = REPO / ".venv-allen"
needs_env = pytest.mark.skipif(not (ALLEN_ENV / "bin" / "python").exists(),
                               reason="no .venv-allen (create it with `make allen-env`)")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_missing_allen_env_says_run_make_allen_env(tmp_path, capsys):
    rc = main(["--ids", "501940850", "--out", str(tmp_path / "out"), "--allen-env", str(tmp_path / "no-env")])
    err = capsys.readouterr().err
    assert rc == 2 and "make allen-env" in err and len(err.strip().splitlines()) == 1
    assert leftovers(tmp_path) == []


def test_ids_or_selection_are_required(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out")]) == 2
    assert "--ids or --select-papers" in capsys.readouterr().err


@needs_env
@pytest.mark.slow
def test_unreachable_api_fails_in_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--ids", "501940850", "--out", str(out), "--host", "127.0.0.1:9", "--connect-timeout", "5"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1
    assert err.startswith("error: cannot reach 127.0.0.1:9: ")
    assert leftovers(tmp_path) == []  # no out/, no temporary download folder


class FakeAllenApi:
    """A local stand-in for api.brain-map.org: answers allensdk's RMA query with a download link and serves
    ``payload`` for it, except for experiment ids in ``broken`` (HTTP 500 on their file)."""

    def __init__(self, payload: bytes, broken: set[int] = frozenset()):
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server naming)
                if "query.json" in self.path:
                    exp = int(self.path.split("attachable_id$eq")[1].split("%5D")[0])
                    body = json.dumps({"success": True, "id": 0, "start_row": 0, "num_rows": 1, "total_rows": 1,
                                       "msg": [{"download_link": f"/files/{exp}.nwb"}]}).encode()
                    return self._send(200, body, "application/json")
                if self.path.startswith("/files/"):
                    exp = int(self.path.rsplit("/", 1)[1].split(".")[0])
                    if exp in api.broken:
                        return self._send(500, b"internal error", "text/plain")
                    return self._send(200, api.payload, "application/octet-stream")
                return self._send(404, b"not found", "text/plain")

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.payload, self.broken = payload, set(broken)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def nwb1_payload(tmp_path_factory) -> bytes:
    from ingest.synth import SynthConfig

    paths = synthesize(tmp_path_factory.mktemp("payload"), sessions=2, seed=0, ophys_format="nwb1",
                       config=SynthConfig(duration_s=30.0, rois_per_plane=4))
    return paths[1].read_bytes()


@needs_env
@pytest.mark.slow
def test_download_through_allensdk_moves_files_into_out(tmp_path, nwb1_payload, capsys):
    api = FakeAllenApi(nwb1_payload)
    try:
        rc = main(["--ids", "501940850,501940851", "--out", str(tmp_path / "out"), "--host", api.host])
    finally:
        api.close()
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert leftovers(tmp_path) == ["out"]
    files = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in files] == ["ophys_experiment_501940850.nwb", "ophys_experiment_501940851.nwb"]
    assert all(p.read_bytes() == nwb1_payload for p in files)
    assert "2 files downloaded" in captured.out


@needs_env
@pytest.mark.slow
def test_server_error_part_way_leaves_nothing_partial(tmp_path, nwb1_payload, capsys):
    out = tmp_path / "out"
    api = FakeAllenApi(nwb1_payload, broken={501940851})
    try:
        rc = main(["--ids", "501940850", "501940851", "--out", str(out), "--host", api.host])
    finally:
        api.close()
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert leftovers(tmp_path) == []  # the first file was downloaded, then discarded with the failed run
