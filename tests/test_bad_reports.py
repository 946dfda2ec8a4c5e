"""`acceptrace report` on files that are not reports, or not good ones: one line on
stderr, exit code 2, never a traceback (no root needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from acceptrace.cli import main
from acceptrace.model import MAX_REPORT_BYTES, Run

FIXTURE = Path(__file__).parent / "fixtures" / "run-demo-overflow.json"
GOOD = json.loads(FIXTURE.read_text())


def changed(**paths: object) -> dict:
    """The fixture with values replaced: changed(**{"meta.port": 5})."""
    d = json.loads(json.dumps(GOOD))
    for path, value in paths.items():
        keys = [int(k) if k.isdigit() else k for k in path.split(".")]
        parent = d
        for k in keys[:-1]:
            parent = parent[k]
        parent[keys[-1]] = value
    return d


def report(tmp_path: Path, content: str | bytes, capsys: pytest.CaptureFixture[str],
           name: str = "bad.json") -> tuple[int, str]:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    rc = main(["report", str(path)])
    err = capsys.readouterr().err
    return rc, err


def one_line(rc: int, err: str, want: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("acceptrace: ") and "is not an acceptrace report" in lines[0], err
    assert want in lines[0], (want, lines[0])
    assert len(lines[0]) < 300, lines[0]


BAD = {
    "truncated": (FIXTURE.read_text()[:5000], "not JSON"),
    "empty": ("", "not JSON"),
    "binary": (b"\xff\xfe\x00garbage\x80", "not JSON"),
    "not utf-8": (b'{"schema": "acceptrace/v1", "x": "\xe9"}', "not UTF-8"),
    "another tool's JSON": ('{"traceEvents": []}', "no schema field"),
    "another version": (json.dumps(changed(schema="acceptrace/v2")),
                        "'acceptrace/v2' is not one this version reads"),
    "another schema": (json.dumps(changed(schema="otel/v1")), "schema is 'otel/v1'"),
    "a list": ("[1, 2, 3]", "top level is not a JSON object"),
    "deep nesting": ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "deep nesting in an object": ('{"schema": "acceptrace/v1", "extra": ' + '{"a": ' * 100_000
                                  + "1" + "}" * 100_001, "nested too deeply"),
    "NaN": (json.dumps(changed(**{"meta.duration_s": float("nan")})), "NaN"),
    "Infinity": (json.dumps(changed(**{"stages.accept_queue.max": float("inf")})), "Infinity"),
    "1e999 (a float too large)": (
        json.dumps(changed(**{"stages.accept_queue.sum": 1.0})).replace(
            '"sum": 1.0', '"sum": 1e999'), "sum must be a finite"),
    "an integer of 5000 digits": ('{"schema": "acceptrace/v1", "x": ' + "9" * 5000 + "}",
                                  "thousands of digits"),
    "a negative count": (json.dumps(changed(**{"connections.accepted": -5})),
                         "connections.accepted must be a non-negative integer"),
    "a negative drop": (json.dumps(changed(**{"drops.listen_overflow": -1})),
                        "drops.listen_overflow"),
    "a count too large for u64": (json.dumps(changed(**{"kernel_counters.TcpPassiveOpens":
                                                        1 << 64})),
                                  "kernel_counters.TcpPassiveOpens"),
    "a string count": (json.dumps(changed(**{"connections.accepted": "694"})),
                       "connections.accepted"),
    "a boolean count": (json.dumps(changed(**{"processes.0.accepted": True})),
                        "processes[].accepted"),
    "buckets that do not add up": (
        json.dumps(changed(**{"stages.accept_queue.count":
                              GOOD["stages"]["accept_queue"]["count"] + 1})),
        "stages.accept_queue: malformed histogram: bucket counts do not add up"),
    "a bucket that is not one": (
        json.dumps(changed(**{"stages.handshake.buckets.0.lo": 17})), "is not a bucket"),
    "a bucket listed twice": (
        json.dumps(changed(**{"stages.handshake.buckets": GOOD["stages"]["handshake"]["buckets"]
                              * 2})), "listed twice"),
    "a negative bucket count": (
        json.dumps(changed(**{"stages.handshake.buckets.0.count": -3})), "count must be"),
    "min above max": (json.dumps(changed(**{"stages.accept_queue.min": 1e9})),
                      "min is above max"),
    "max outside its bucket": (json.dumps(changed(**{"stages.accept_queue.max": 3})),
                               "max is not in its bucket"),
    "stages of the wrong type": (json.dumps(changed(stages=[1, 2])), "stages must be an object"),
    "a histogram of the wrong type": (json.dumps(changed(**{"stages.handshake": "fast"})),
                                      "stages.handshake must be an object"),
    "meta missing": (json.dumps({k: v for k, v in GOOD.items() if k != "meta"}),
                     "missing field meta"),
    "meta.port too large": (json.dumps(changed(**{"meta.port": 70000})), "meta.port"),
    "meta.hooks not a list": (json.dumps(changed(**{"meta.hooks": 5})), "meta.hooks"),
    "a slowest entry of strings": (json.dumps(changed(**{"slowest.0.total_us": "slow"})),
                                   "slowest[].total_us"),
    "a slowest entry without its address": (
        json.dumps(changed(slowest=[{"family": "ipv4"}])), "missing field"),
    "an interval's stages a list": (json.dumps(changed(**{"intervals.0.stages": []})),
                                    "intervals[].stages must be an object"),
    "an interval's p99 a string": (
        json.dumps(changed(**{"intervals.0.stages.accept_queue.p99": "big"})),
        "intervals[].stages.accept_queue.p99"),
    "targets not a list": (json.dumps(changed(targets={"a": 1})), "targets must be a list"),
    "a target without meta": (json.dumps(changed(targets=[{"connections": {}}])),
                              "missing field targets[].meta"),
    "cost of the wrong type": (json.dumps(changed(cost=[1])), "cost must be an object"),
    "a cost program with negative runs": (
        json.dumps(changed(cost={"stats": None, "seconds": 1.0,
                                 "programs": [{"hook": "x", "runs": -1, "run_time_ns": 0}]})),
        "cost.programs[].runs"),
    "extra.accept_untracked negative": (json.dumps(changed(**{"extra.accept_untracked": -2})),
                                        "extra.accept_untracked"),
    "a huge string": (json.dumps(changed(**{"meta.hostname": "x" * 100_000})),
                      "meta.hostname must be a string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_report_is_one_line_and_exit_2(tmp_path, capsys, case):
    content, want = BAD[case]
    one_line(*report(tmp_path, content, capsys), want)


def test_the_fixture_itself_reads(tmp_path, capsys):
    rc, err = report(tmp_path, FIXTURE.read_text(), capsys, "good.json")
    assert rc == 0 and err == "", err


def test_a_200_mb_file_is_refused_before_it_is_read(tmp_path, capsys):
    path = tmp_path / "huge.json"
    with open(path, "wb") as f:  # sparse: 200 MB that take no disk
        f.truncate(200 << 20)
    rc = main(["report", str(path)])
    err = capsys.readouterr().err
    one_line(rc, err, "200.0 MiB: larger than any report acceptrace writes (64.0 MiB at most)")


def test_a_file_at_the_limit_of_hostile_json_is_one_line(tmp_path, capsys):
    """Just under the size limit, all of it one list in a field nobody reads: read
    (later versions may add fields), then refused for what is wrong, in one line."""
    filler = "[" + "0," * ((MAX_REPORT_BYTES - 200) // 2 - 1) + "0]"
    text = '{"schema": "acceptrace/v1", "future": ' + filler + ', "meta": 1}'
    assert len(text) <= MAX_REPORT_BYTES
    one_line(*report(tmp_path, text, capsys), "missing field connections")


@pytest.mark.parametrize("how", ["missing", "directory", "unreadable"])
def test_unreadable_paths(tmp_path, capsys, how):
    path = tmp_path / "x.json"
    if how == "directory":
        path.mkdir()
    elif how == "unreadable":
        path.write_text(FIXTURE.read_text())
        path.chmod(0)
        if os.geteuid() == 0:
            pytest.skip("root reads a file of mode 000")
    rc = main(["report", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot read" in err or "is a directory" in err or "does not exist" in err, err


def test_compare_with_one_bad_file(tmp_path, capsys):
    bad = tmp_path / "after.json"
    bad.write_text(json.dumps(changed(**{"connections.read": -1})))
    rc = main(["report", str(FIXTURE), str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"acceptrace: {bad} is not an acceptrace report: connections.read must be a "
        "non-negative integer or null, not -1"], err


def test_the_process_exits_2_with_one_line(tmp_path):
    """The same through the installed entry point in a process of its own: the real
    exit code and stderr, nothing on stdout."""
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    res = subprocess.run([sys.executable, "-m", "acceptrace", "report", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.strip().splitlines() == [
        f"acceptrace: {path} is not an acceptrace report: not JSON acceptrace writes: "
        "nested too deeply"], res.stderr


def test_unknown_fields_of_a_later_version_are_ignored():
    d = changed(**{"meta.future": {"deep": [1, 2]}, "stages.accept_queue.future": "x"})
    d["future_section"] = [{"a": None}]
    d["intervals"][0]["future"] = 1
    d["queues"]["listeners"][0]["future"] = True
    run = Run.from_json(d)
    assert run.connections == GOOD["connections"]


def test_every_field_the_reader_builds_has_a_check():
    """A field added with a type the reader has no check for would be a TypeError
    (a traceback) on every report: caught here instead."""
    from dataclasses import fields

    from acceptrace import model

    for cls in (model.Meta, model.Listener, model.ProcessCount, model.Sample, model.Interval,
                model.ProgramCost, model.Cost):
        for f in fields(cls):
            if (cls, f.name) == (model.Cost, "programs"):
                continue  # read item by item as ProgramCost
            assert str(f.type) in model._CHECKS, (cls.__name__, f.name, f.type)
