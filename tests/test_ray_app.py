"""The flags of `tokenmill serve` as a Ray Serve application (`--ingress-replicas`, and the
`serve run` config deploy/ray-serve.yaml): what they refuse before anything starts, and that the
shipped config names the builder with flags its parser takes. The application itself runs in
tests/server/test_ingress_replicas_server.py."""

from pathlib import Path

import pytest
import yaml

from tokenmill.cli import main
from tokenmill.ray_app import build_application, parse_flags

CONFIG = Path(__file__).parents[1] / "deploy" / "ray-serve.yaml"


def serve(capsys, *flags: str) -> tuple[int, str]:
    code = main(["serve", *flags])
    return code, capsys.readouterr().err


def test_several_ingress_replicas_without_redis_are_refused(capsys, default_model_path,
                                                            tmp_path):
    code, err = serve(capsys, "--model", str(default_model_path), "--ingress-replicas", "2",
                      "--db", f"sqlite:///{tmp_path / 'x.db'}")
    assert code == 2
    assert "--ingress-replicas above 1 needs --redis" in err


def test_a_spooling_ledger_is_refused_with_ingress_replicas(capsys, default_model_path):
    code, err = serve(capsys, "--model", str(default_model_path), "--ingress-replicas", "1",
                      "--ledger-fail-open")
    assert code == 2
    assert "--ledger-fail-open" in err and "fails closed" in err


def test_zero_ingress_replicas_are_refused(capsys, default_model_path):
    code, err = serve(capsys, "--model", str(default_model_path), "--ingress-replicas", "0",
                      "--no-auth")
    assert code == 2
    assert "--ingress-replicas must be at least 1, not 0" in err


def test_the_shipped_ray_serve_config_names_the_builder_with_flags_serve_accepts():
    config = yaml.safe_load(CONFIG.read_text())
    [app] = config["applications"]
    module, name = app["import_path"].split(":")
    assert (module, name) == ("tokenmill.ray_app", "build_application")
    args = parse_flags(app["args"]["flags"])
    assert (args.replicas, args.ingress_replicas) == (2, 2)
    assert args.redis.startswith("redis://") and args.db.startswith("postgresql://")


def test_the_builder_refuses_flags_it_cannot_serve_with_a_one_line_error():
    with pytest.raises(ValueError, match="needs --redis"):
        build_application({"flags": "--ingress-replicas 3 --db sqlite:////tmp/never.db"})


def test_each_ingress_replica_takes_what_the_server_admits_not_ray_serves_default_five(
        default_model_path, tmp_path, monkeypatch):
    """Past its max_ongoing_requests Ray Serve's proxy queues requests where the server's own
    admission (503s, per-key 429s) never sees them: at Ray's default of 5, eight simultaneous
    streams waited seconds for their first token."""
    monkeypatch.setenv("TOKENMILL_HOME", str(tmp_path))
    app = build_application({"flags": ["--model", str(default_model_path), "--no-auth",
                                       "--ingress-replicas", "2", "--replicas", "3",
                                       "--max-pending-sequences", "700"]})
    ingress = app._bound_deployment  # the application's ingress: its options and bound args
    assert (ingress.name, ingress.num_replicas, ingress.max_ongoing_requests) == ("ingress", 2,
                                                                                   700)
    _, models, engines = ingress.init_args
    assert [model.id for model in models] == ["SmolLM2-135M-Instruct"]
    [engine] = engines
    assert (engine._bound_deployment.name, engine._bound_deployment.num_replicas) == (
        "engine-0", 3)


def test_serve_run_of_the_shipped_config_serves_the_api(default_model_path, tmp_path):
    """Ray Serve's own CLI runs deploy/ray-serve.yaml, its flags and proxy address made local
    (no Redis or PostgreSQL, one replica of each), and the API answers through its proxy."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = yaml.safe_load(CONFIG.read_text())
    config["proxy_location"] = "HeadOnly"
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    config["applications"][0]["args"]["flags"] = (
        f"--model {default_model_path} --no-auth --replicas 1 --replica-threads 1 "
        "--kv-cache-gib 0.25 --max-model-len 512")
    local = tmp_path / "ray-serve.yaml"
    local.write_text(yaml.safe_dump(config))
    serve_cli = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
    log = (tmp_path / "serve-run.log").open("w")
    proc = subprocess.Popen(serve_cli + ["run", str(local)], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, TOKENMILL_HOME=str(tmp_path)),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve-run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "serve run did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "temperature": 0, "max_tokens": 4,
            "messages": [{"role": "user", "content": "What is 2 + 2?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        os.killpg(proc.pid, 2)  # SIGINT: serve run deletes the application and stops Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
