"""The benchmark's pure logic around peers and flavours, without the peers installed: which servers a
command line chooses, the scenarios, which wire each server speaks, the request files, the summary of
servers that sit a scenario out, the report's columns, the peers' configuration (TorchServe's batching,
KServe's flags), the reuse of an installed environment and the Java hint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench import peers, report, run, wire
from bench.run import JSON, V2BIN, Measurement, Scenario


@pytest.mark.parametrize(("argv", "servers"), [
    ([], ["floor", "baseline", "project"]),
    (["--peers"], ["floor", "baseline", "project", "torchserve", "kserve"]),
    (["--grpc", "--peers"], ["floor", "baseline", "project", "grpc", "torchserve", "kserve"]),
    (["--servers", "floor,kserve"], ["floor", "kserve"]),
    (["--servers", "floor", "--peers"], ["floor", "torchserve", "kserve"]),
    (["--before", "/tmp"], ["floor", "baseline", "project", "before"]),
])
def test_servers_chosen(argv: list[str], servers: list[str]) -> None:
    assert run.parse_args(argv).servers == servers


def test_bad_server_choices_are_refused() -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--servers", "before"])
    with pytest.raises(SystemExit):
        run.parse_args(["--servers", "floor,grpc"])
    with pytest.raises(SystemExit):
        run.parse_args(["--servers", "nginx"])


def test_scenarios_add_the_binary_runs_at_the_rows_connections() -> None:
    args = run.parse_args(["--conns", "1,16", "--rows", "64", "--rows-conns", "8"])
    assert args.v2bin_rows == [1024]
    ids = [s.id for s in run.build_scenarios(args.conns, args.rows, args.rows_conns, args.v2bin_rows)]
    assert ids == ["rows1_c1", "rows1_c16", "rows64_c8", "v2bin_rows1024_c8"]
    assert run.parse_args(["--v2bin-rows", "none"]).v2bin_rows == []
    assert [s.id for s in run.build_scenarios([16], [64], 16, [])] == ["rows1_c16", "rows64_c16"]


def test_every_server_has_a_json_wire_and_who_speaks_v2_binary() -> None:
    assert set(run.SERVER_WIRES) == set(run.SERVER_NAMES)
    assert all(JSON in wires for wires in run.SERVER_WIRES.values())
    binary = {name for name, wires in run.SERVER_WIRES.items() if V2BIN in wires}
    assert binary == {"floor", "project", "before", "kserve"}
    assert run.SERVER_WIRES["torchserve"][JSON] is wire.TORCHSERVE
    assert run.SERVER_WIRES["kserve"][JSON] is wire.KSERVE_V1
    assert run.wire_name("baseline", V2BIN) is None
    assert run.wire_name("grpc", JSON) == "grpc-v2" and run.wire_name("kserve", V2BIN) == "v2-binary"


def test_requests_are_prepared_once_per_wire_and_rows(tmp_path: Path) -> None:
    scenarios = run.build_scenarios([1, 16], [64], 16, [128])
    requests = run.prepare_requests(tmp_path, ["floor", "baseline", "project", "kserve"], scenarios)
    assert set(requests) == {("native", 1), ("native", 64), ("v2-binary", 128), ("kserve-v1", 1),
                             ("kserve-v1", 64)}
    assert requests[("kserve-v1", 64)].path == "/v1/models/simplenn:predict"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{w}_{r}.body" for w, r in requests)


def measurement(server: str, scenario: Scenario, req_s: float) -> Measurement:
    return Measurement(round=0, server=server, scenario=scenario.id, rows=scenario.rows, conns=scenario.conns,
                       flavour=scenario.flavour, wire=run.wire_name(server, scenario.flavour), requests=100,
                       ok_requests=100, req_s=req_s, rows_s=req_s * scenario.rows, p50_us=10.0, p99_us=20.0,
                       cpu_us_per_req=5.0)


def test_summary_leaves_out_servers_that_sat_a_scenario_out() -> None:
    single, binary = Scenario(1, 16), Scenario(1024, 16, V2BIN)
    names = ["floor", "baseline", "kserve"]
    runs = [measurement(name, single, 100.0 * (i + 1)) for i, name in enumerate(names)]
    runs += [measurement("floor", binary, 1000.0), measurement("kserve", binary, 250.0)]
    summary = run.summarize(runs, [single, binary, Scenario(64, 16)], names)
    assert list(summary) == [single.id, binary.id]  # no server ran rows64: no entry
    assert set(summary[binary.id]) == {"floor", "kserve"}
    kserve = summary[binary.id]["kserve"]
    assert kserve["wire"] == "v2-binary" and kserve["flavour"] == V2BIN
    assert kserve["vs_floor"]["req_s"] == pytest.approx(0.25) and kserve["vs_baseline"]["req_s"] is None
    assert summary[single.id]["kserve"]["vs_baseline"]["req_s"] == pytest.approx(1.5)

    result = {"meta": {"date": "d", "nproc": 2, "git_commit": None, "torch": "t", "wrk": "w", "rounds": 1,
                       "duration_s": 1, "command": "c", "scenarios": [{"rows": 1, "conns": 16}, {"rows": 1024,
                                                                                                   "conns": 16}],
                       "peers": {"kserve": {"versions": {"kserve": "0.21.0"}, "install_s": 68.0}}},
              "servers": {name: {"error": None, "startup_s": 1.5, "pss_ready_mib": 100.0, "pss_end_mib": 120.0}
                          for name in names},
              "summary": summary}
    text = report.format_report(result)
    assert re.search(r"\| kserve +\| kserve-v1 +\|", text) and re.search(r"\| kserve +\| v2-binary +\|", text)
    assert "PSS MiB ready" in text and "peer kserve: kserve 0.21.0; first install 68 s" in text


def test_torchserve_config_batches_64_rows_within_5_ms_on_one_worker(tmp_path: Path) -> None:
    lines = dict(line.split("=", 1) for line in peers.torchserve_config(tmp_path, "simplenn.mar").splitlines())
    model = json.loads(lines["models"])["simplenn"]["1.0"]
    assert (model["batchSize"], model["maxBatchDelay"], model["minWorkers"], model["maxWorkers"]) == (64, 5, 1, 1)
    assert lines["enable_envvars_config"] == "true" and lines["load_models"] == "simplenn.mar"


def test_torchserve_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "find_java", lambda: "/usr/bin/java")
    monkeypatch.setattr(peers, "build_archive", lambda venv, weights, store: "simplenn.mar")
    spec = peers.torchserve_spec(tmp_path / "venv", tmp_path / "model.pth", tmp_path / "run", 30.0)
    assert spec.argv[0] == str(tmp_path / "venv" / "bin" / "torchserve")
    assert {"--foreground", "--ncs", "--disable-token-auth"} <= set(spec.argv)
    assert spec.env["TS_INFERENCE_ADDRESS"] == "http://{host}:{port}" and spec.env["OMP_NUM_THREADS"] == "1"
    assert spec.env["TMPDIR"] == str(tmp_path / "run")  # its pid file and unpacked models stay in the run
    assert spec.ready_path == "/predictions/simplenn" and json.loads(spec.ready_body or b"")["input"]
    assert '"ACCESS_LOG" level="off"' in (tmp_path / "run" / "log4j2.xml").read_text()


def test_kserve_spec(tmp_path: Path) -> None:
    spec = peers.kserve_spec(tmp_path / "venv", tmp_path / "model.pth", tmp_path / "run", 30.0)
    argv = spec.argv
    assert argv[:3] == [str(tmp_path / "venv" / "bin" / "python"), "-m", "bench.apps.kserve_app"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {"--http_port": "{port}", "--grpc_port": "{grpc_port}", "--enable_grpc": "false",
                     "--workers": "1", "--enable_latency_logging": "false", "--configure_logging": "false"}
    assert spec.env["BENCH_TORCH_THREADS"] == "1" and spec.ready_path == "/v1/models/simplenn"


def fake_install(peer: peers.Peer, cache: Path) -> Path:
    venv = peers.venv_dir(peer, cache)
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / peers.STAMP).write_text(json.dumps({"wanted": peers.wanted_stamp(peer), "install_s": 12.5,
                                                "versions": {"kserve": "0.21.0"}}))
    return venv


def test_an_installed_environment_is_reused_and_a_stale_one_is_not(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    peer = peers.PEERS["kserve"]
    venv = fake_install(peer, tmp_path)
    monkeypatch.setattr(peers.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert peers.installed(peer, tmp_path) and peers.ensure_venv(peer, tmp_path) == venv
    assert peers.install_info(peer, tmp_path)["install_s"] == 12.5
    newer = peers.Peer(peer.name, peer.title, ("kserve==0.99.0",), peer.wires)
    assert not peers.installed(newer, tmp_path)


def test_every_peer_pins_its_packages_and_takes_torch_from_the_constraints() -> None:
    constraints = peers.CONSTRAINTS.read_text()
    assert "torch==2.13.0+cpu" in constraints
    for peer in peers.PEERS.values():
        assert peer.requirements[0] == "torch"
        assert all("==" in package for package in peer.packages), peer.packages


def test_missing_java_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    with pytest.raises(peers.PeerError, match="apt-get install -y openjdk-17-jre-headless"):
        peers.find_java()
    with pytest.raises(peers.PeerError, match="openjdk"):
        peers.peer_spec("torchserve", Path("weights/model.pth"), Path("/nonexistent"), 10.0)


def test_peer_names_and_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert peers.parse_names("kserve") == ["kserve"] and peers.parse_names("") == list(peers.PEER_NAMES)
    with pytest.raises(Exception, match="unknown: tgi"):
        peers.parse_names("tgi")
    monkeypatch.setenv(peers.CACHE_ENV, str(tmp_path))
    assert peers.cache_dir() == tmp_path / "peers"
