"""The dashboard's web app in process: read-only, confined to its roots, token off-localhost."""

from __future__ import annotations

import asyncio
import socket

import pytest
from starlette.testclient import TestClient

from test_monitor_runs import epoch_line, status, write
from tolaria.cli import main
from tolaria.dashboard.app import create_app, plotly_js
from tolaria.dashboard.guard import TOKEN_COOKIE, TOKEN_HEADER

LOCAL = "http://127.0.0.1"


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    run = root / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run: {epochs: 4}\n")
    write(run / "metrics.jsonl", epoch_line(0, acc=0.25) + epoch_line(1, acc=0.5))
    status(run)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.yaml").write_text("run: {epochs: 1}\n")
    (root / "escape").symlink_to(tmp_path / "secret")
    return root


@pytest.fixture
def client(runs, tmp_path):
    return TestClient(create_app(runs, tmp_path / "academy"), base_url=LOCAL)


def raw_get(app, path: str) -> int:
    """The status of ``GET path`` sent as is: no client normalises its ``..``."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(),
             "query_string": b"", "headers": [(b"host", b"127.0.0.1")], "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "http_version": "1.1",
             "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"]


def test_the_pages_and_the_json_show_the_runs(client):
    index = client.get("/")
    assert index.status_code == 200 and 'href="/runs/r1"' in index.text
    assert "escape" not in index.text  # a symlink is not a run of this root
    run = client.get("/api/runs/r1").json()
    assert run["curves"]["val_accuracy"] == [0.25, 0.5]
    assert run["summary"]["status"] == "running" and run["summary"]["epochs"] == 4
    page = client.get("/runs/r1")
    assert page.status_code == 200 and "/static/plotly.min.js" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_a_live_page_is_sent_only_what_changed(client, runs):
    first = client.get("/runs/r1/sections").json()
    assert first["changed"] and first["charts"]["curves"]["epoch"] == [0, 1]
    again = client.get("/runs/r1/sections", params={"since": first["cursor"]}).json()
    assert again == {"changed": False, "cursor": first["cursor"]}
    write(runs / "r1" / "metrics.jsonl", epoch_line(2, acc=0.75))
    update = client.get("/runs/r1/sections", params={"since": first["cursor"]}).json()
    assert update["changed"] and update["charts"]["curves"]["val_accuracy"][-1] == 0.75
    assert "3 / 4" in update["sections"]["summary"]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_every_method_but_get_and_head_is_refused(client, method):
    for path in ("/", "/runs/r1", "/api/runs/r1", "/static/dashboard.js", "/nowhere"):
        answer = client.request(method, path)
        assert answer.status_code == 405, (method, path)
        assert answer.headers["allow"] == "GET, HEAD"
    assert client.head("/runs/r1").status_code == 200


def test_run_ids_cannot_leave_the_runs_root(client, runs):
    app = client.app
    assert raw_get(app, "/runs/..") == 400
    assert raw_get(app, "/api/runs/..") == 400
    assert raw_get(app, "/runs/.hidden") == 400
    assert raw_get(app, "/runs/../secret") == 404  # a separator never matches a run id
    assert raw_get(app, "/api/runs//etc/passwd") == 404
    assert raw_get(app, "/runs/escape") == 404  # a symlink out of the root
    assert client.get("/runs/..%2Fsecret").status_code == 404
    assert client.get("/runs/nope").status_code == 404
    assert client.get("/static/..%2F..%2Fconfig.py").status_code == 404
    assert client.get("/static/app.py").status_code == 404
    assert client.get("/runs/r1").status_code == 200


def test_a_loopback_server_answers_only_to_loopback_names(client):
    assert client.get("/", headers={"host": "evil.example:8765"}).status_code == 400
    assert client.get("/", headers={"host": "localhost:8765"}).status_code == 200
    assert client.get("/", headers={"host": "[::1]:8765"}).status_code == 200


def test_off_localhost_every_request_needs_the_token(runs, tmp_path):
    token = "s3cret-token"
    app = create_app(runs, tmp_path / "academy", token=token, loopback=False)
    anyone = TestClient(app, base_url="http://10.1.2.3:8765")
    assert anyone.get("/").status_code == 401
    assert anyone.get("/api/runs/r1").status_code == 401
    assert anyone.get("/", params={"token": "wrong"}).status_code == 401
    assert anyone.get("/", headers={TOKEN_HEADER: "s3cret-tokeN"}).status_code == 401
    assert anyone.get("/api/runs", headers={TOKEN_HEADER: token}).status_code == 200
    browser = TestClient(app, base_url="http://10.1.2.3:8765")
    opened = browser.get("/", params={"token": token})
    assert opened.status_code == 200 and TOKEN_COOKIE in opened.headers["set-cookie"]
    assert browser.get("/runs/r1").status_code == 200  # the cookie carries it on
    assert anyone.post("/", params={"token": token}).status_code == 405


def test_plotly_is_served_from_the_installed_package(client):
    assert plotly_js().name == "plotly.min.js"
    answer = client.get("/static/plotly.min.js")
    assert answer.status_code == 200 and "plotly" in answer.text[:2000].lower()
    assert client.get("/static/dashboard.js").headers["content-type"].startswith(
        "text/javascript")


def test_a_port_in_use_is_one_line_and_exit_2(runs, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--runs", str(runs), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"port {port} on 127.0.0.1 is in use" in err


def test_a_runs_root_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["dashboard", "--runs", str(tmp_path / "file"), "--port", "0"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_the_academy_page_says_when_there_is_no_nightly_session(client, tmp_path):
    page = client.get("/academy")
    assert page.status_code == 200
    assert '<p class="empty" data-empty="sessions">No nightly session yet.</p>' in page.text
    assert page.text.count("status-no-data") == 5  # every §7 metric: no data
    assert 'data-version="v0" class=champion' in page.text  # the built-in base policy
    assert client.get("/api/academy").json()["sessions"] == []
    assert not (tmp_path / "academy").exists()  # only read, never created
