"""Hostile input against every kind of session: only ProtocolErrors, and they close the connection.

The sessions are the real ones, behind a real L{FramedProtocol} on a
C{StringTransport}, set up by L{dfly.devtools.fuzz} (a supernode with an
in-memory origin, a slice server over a real store, a downloader with pending
requests, a PeerNode driven through its supernode link, a PeerNode's local
API).  Hypothesis generates control messages (known and random ops, fields
from the protocol's vocabulary and arbitrary JSON values) and raw bytes; the
fuzzer's core runs ~20,000 frames with a fixed seed.

A bug found this way goes in L{KNOWN_BUGS} while it is open (the property
tests then step over the inputs that trigger it, so they keep guarding
everything else) with a minimal reproduction marked C{xfail(strict=True)};
once fixed, the entry and the marker go and the reproduction stays as a
regression test.
"""

from __future__ import annotations

import hashlib
import random
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

from dfly.devtools import fuzz
from dfly.devtools.fuzz import Conn, LogWatch, World
from dfly.urls import task_id_for

# (exception type, "file:function" of the innermost dfly frame) of crashes reported as dfly bugs.
KNOWN_BUGS: dict[tuple[str, str], str] = {}
# Broken invariants reported as dfly bugs.
KNOWN_PROBLEMS: dict[str, str] = {}

FIELDS = [
    "task", "piece", "req", "url", "peer", "port", "host", "source", "md5", "len", "piece_size",
    "reason", "state", "generation", "length", "piece_count", "kind", "status", "headers", "filter",
    "have", "identifier", "version", "received", "total", "path", "relay",
]
PLAUSIBLE: list[Any] = [
    *fuzz.URLS,
    *(task_id_for(u) for u in fuzz.URLS),
    *fuzz.SLICE_TASKS,
    fuzz.FETCH_TASK,
    0, 1, 2, 3, fuzz.P, fuzz.P - 5, len(fuzz.FILE_CONTENT),
    "cdn", "resident", "p1", "done", "running", "failed", "0-1", "", "OriginError",
    hashlib.md5(fuzz.FILE_CONTENT).hexdigest(),
    fuzz.piece_md5(fuzz.FILE_CONTENT),
    ["X-A: b"], ["sig"], {"id": "p9", "host": "10.0.0.5", "port": 15001},
]
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=10,
)
VALUES = st.sampled_from(PLAUSIBLE) | st.sampled_from(fuzz.STRINGS) | JSON
OPS = st.sampled_from(fuzz.ALL_OPS) | st.text(max_size=10)
FILE_TASK = task_id_for(fuzz.FILE_URL)
TASK_INFO = {"task": FILE_TASK, "state": "running", "generation": "g1", "length": 3000, "piece_size": fuzz.P, "piece_count": 1}
# One well-formed message per op that some session accepts, aimed at the worlds' real state.
TEMPLATES: list[dict[str, Any]] = [
    {"op": "hello", "peer": "p1", "port": 4000},
    {"op": "register", "req": 1, "url": fuzz.FILE_URL},
    {"op": "register", "req": 2, "url": fuzz.MISSING_URL, "have": "0"},
    {"op": "done", "task": FILE_TASK, "piece": 0, "source": "cdn"},
    {"op": "fail", "task": FILE_TASK, "piece": 0, "source": "resident", "reason": "bad md5"},
    {"op": "leave", "task": FILE_TASK},
    {"op": "get", "task": FILE_TASK, "piece": 0},
    {"op": "get", "task": fuzz.SLICE_TASKS[0], "piece": 1},
    {"op": "get", "task": fuzz.SLICE_TASKS[1], "piece": 0, "relay": True},
    {"op": "nack", "task": fuzz.FETCH_TASK, "piece": 0, "reason": "not held"},
    {"op": "slice", "task": fuzz.FETCH_TASK, "piece": 0, "len": 0, "piece_size": fuzz.P},
    {"op": "welcome", "version": 1},
    {"op": "registered", "req": 1, **TASK_INFO},
    {"op": "refused", "req": 1, "reason": "no"},
    {"op": "task_info", **TASK_INFO},
    {"op": "task_failed", **TASK_INFO, "state": "failed", "reason": "404", "kind": "OriginError", "status": 404},
    {"op": "task_reset", "task": FILE_TASK},
    {"op": "check", "task": FILE_TASK, "piece": 0, "md5": fuzz.piece_md5(fuzz.FILE_CONTENT)},
    {"op": "lost", "task": FILE_TASK, "piece": 0},
    {"op": "fail", "task": FILE_TASK, "piece": 0, "source": "resident", "reason": "bad md5", "kind": "md5"},
    {
        "op": "assign", "task": FILE_TASK, "piece": 0, "source": "cdn", "len": 3000, "piece_size": fuzz.P,
        "md5": fuzz.piece_md5(fuzz.FILE_CONTENT),
    },
    {
        "op": "assign", "task": FILE_TASK, "piece": 0, "source": {"id": "p9", "host": "10.0.0.5", "port": 15001},
        "len": 3000, "piece_size": fuzz.P, "md5": fuzz.piece_md5(fuzz.FILE_CONTENT), "relay": True,
    },
    {"op": "download", "url": fuzz.FILE_URL},
]
RANDOM_MESSAGES = st.builds(
    lambda op, fields: {**fields, "op": op},
    OPS,
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUES, max_size=8),
)
# A template with up to two fields replaced or added and up to one removed.
TEMPLATED_MESSAGES = st.builds(
    lambda base, over, drop: {k: v for k, v in {**base, **over}.items() if k != drop or k == "op"},
    st.sampled_from(TEMPLATES),
    st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=2),
    st.sampled_from(FIELDS) | st.none(),
)
MESSAGES = TEMPLATED_MESSAGES | RANDOM_MESSAGES
HELLO = {"op": "hello", "peer": "hypothesis", "port": 4000}


class Worlds:
    """One world per kind for the module, rebuilt after a known bug left one half-updated."""

    def __init__(self, root: Any) -> None:
        self._root = root
        self._worlds: dict[str, World] = {}
        self._made = 0

    def get(self, kind: str) -> World:
        if kind not in self._worlds:
            self._made += 1
            self._worlds[kind] = fuzz.make_world(kind, str(self._root / f"{kind}-{self._made}"), seed=self._made)
        return self._worlds[kind]

    def reset(self, kind: str) -> None:
        world = self._worlds.pop(kind, None)
        if world is not None:
            world.close()

    def close(self) -> None:
        for kind in list(self._worlds):
            self.reset(kind)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worlds]:
    w = Worlds(tmp_path_factory.mktemp("fuzz-worlds"))
    yield w
    w.close()


@pytest.fixture(scope="module")
def log_watch() -> Iterator[LogWatch]:
    watch = LogWatch()
    globalLogPublisher.addObserver(watch)
    yield watch
    globalLogPublisher.removeObserver(watch)


def is_known(exc_type: str, location: str) -> bool:
    """Whether a crash at C{location} ("file:function:line") is one of the reported dfly bugs."""
    return any(exc_type == t and (location + ":").startswith(loc + ":") for t, loc in KNOWN_BUGS)


def exercise(worlds: Worlds, watch: LogWatch, kind: str, units: list[bytes], seed: int) -> None:
    """Feed C{units} on a fresh connection of C{kind}, then close it and run the timers.

    Fails on anything but ProtocolErrors that close the connection, on invalid
    output, on broken invariants and on logged failures, except for known bugs.
    """
    world = worlds.get(kind)
    watch.failures.clear()
    conn: Conn = world.open(random.Random(seed))
    for unit in units:
        try:
            conn.feed(unit)
        except Exception as e:
            if is_known(type(e).__name__, fuzz.dfly_frame(e)):
                conn.lose()
                worlds.reset(kind)
                return
            raise
        if conn.errors:
            assert conn.closed, f"{conn.errors[0]!r} did not close the connection"
            break
        conn.pump()
    conn.pump()
    conn.lose()
    problems = [p for p in world.finish(conn) if p not in KNOWN_PROBLEMS]
    assert problems == []
    world.clock.advance(65.0)
    world.after()
    conn.pump()
    assert conn.checker.error is None, f"the session sent an invalid stream: {conn.checker.error}"
    unknown = [text for t, loc, text in watch.failures if not is_known(t, loc)]
    watch.failures.clear()
    assert unknown == [], unknown[0] if unknown else ""


# pytest-twisted rewrites a hypothesis test's inner function in place, which breaks
# @pytest.mark.parametrize on @given tests; so each kind gets its own test functions.


def _control_messages_test(kind: str) -> Any:
    @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(messages=st.lists(MESSAGES, min_size=1, max_size=5), hello=st.booleans(), seed=st.integers(0, 2**16))
    def test(worlds: Worlds, log_watch: LogWatch, messages: list[dict[str, Any]], hello: bool, seed: int) -> None:
        if kind == "supernode" and hello:
            messages = [HELLO, *messages]
        exercise(worlds, log_watch, kind, [fuzz.frame(m) for m in messages], seed)

    test.__doc__ = (
        f"For the {kind} session, any sequence of control messages (known or random ops, fields "
        "with plausible or arbitrary JSON values) is either handled or refused with a ProtocolError "
        "that closes the connection; its output stays a valid frame stream, closing the connection "
        "and running its timers raise nothing, and nothing is logged as a failure."
    )
    return test


def _bytes_test(kind: str) -> Any:
    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(chunks=st.lists(st.binary(max_size=300), min_size=1, max_size=6), seed=st.integers(0, 2**16))
    def test(worlds: Worlds, log_watch: LogWatch, chunks: list[bytes], seed: int) -> None:
        exercise(worlds, log_watch, kind, chunks, seed)

    test.__doc__ = (
        f"For the {kind} session, arbitrary bytes in arbitrary chunks never raise out of "
        "dataReceived: they are consumed or they close the connection."
    )
    return test


def _script_test(kind: str) -> Any:
    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data(), seed=st.integers(0, 2**16))
    def test(worlds: Worlds, log_watch: LogWatch, data: st.DataObject, seed: int) -> None:
        world = worlds.get(kind)
        rng = random.Random(data.draw(st.integers(0, 2**32), label="generator seed"))
        conn = world.open(random.Random(seed))
        units = []
        for _ in range(data.draw(st.integers(1, 12), label="units")):
            if rng.random() < 0.4:
                units.append(fuzz.hostile_unit(world, conn, rng))
            else:
                units.append(world.unit(conn, rng, rng.random() < 0.3))
        conn.lose()
        world.finish(conn)
        exercise(worlds, log_watch, kind, units, seed)

    test.__doc__ = (
        f"For the {kind} session, the fuzzer's own generator (valid, mutated and hostile units, "
        "broken slices included), driven by hypothesis, only ever gives handled input or a "
        "closed connection."
    )
    return test


test_control_messages_supernode = _control_messages_test("supernode")
test_control_messages_slice_server = _control_messages_test("slice_server")
test_control_messages_fetch = _control_messages_test("fetch")
test_control_messages_link = _control_messages_test("link")
test_control_messages_localapi = _control_messages_test("localapi")

test_raw_bytes_supernode = _bytes_test("supernode")
test_raw_bytes_slice_server = _bytes_test("slice_server")
test_raw_bytes_fetch = _bytes_test("fetch")
test_raw_bytes_link = _bytes_test("link")
test_raw_bytes_localapi = _bytes_test("localapi")

test_generated_scripts_supernode = _script_test("supernode")
test_generated_scripts_slice_server = _script_test("slice_server")
test_generated_scripts_fetch = _script_test("fetch")
test_generated_scripts_link = _script_test("link")
test_generated_scripts_localapi = _script_test("localapi")


def test_fuzzer_core_20k_frames_without_crashes(tmp_path: Any) -> None:
    """The fuzzer's core feeds ~20,000 frames (4,000 per session kind, fixed seed) and sees no
    crash other than the reported dfly bugs, while really exercising the sessions: frames are
    fed, some connections are closed for protocol errors and some survive to the end.  (The
    time caps are generous safety nets for a loaded machine, not speed targets.)"""
    unknown: list[str] = []
    for kind in fuzz.KINDS:
        report = fuzz.run_kind(
            kind, 4000, seed=2024, seconds=600.0, root=str(tmp_path / kind), hang_seconds=60.0, max_memory_mib=2048
        )
        assert report.frames >= 4000, report
        assert 0 < report.protocol_closes < report.connections, report
        assert not report.stopped_by_time
        for sig, info in report.crashes.items():
            known = info.error in KNOWN_PROBLEMS if info.where == "invariant" else is_known(info.exc_type, info.location)
            if not known:
                unknown.append(f"{kind}: {info.count} x {sig}\n{info.examples[0]}")
    assert unknown == [], "\n\n".join(unknown)


def test_fuzzer_cli_reports_and_exits(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The command line runs a tiny in-process campaign, prints the summary table and exits 0
    (no crash) or 1 (crashes), never anything else."""
    code = fuzz.main(["--frames", "500", "--seconds", "30", "--seed", "1", "--jobs", "1", "--kinds", "slice_server,link"])
    out = capsys.readouterr().out
    assert code in (0, 1)
    assert "slice_server" in out and "link" in out and "frames/s" in out


# -- regressions: inputs the fuzzer once found to escape as non-protocol errors ----------------


def feed_all(world: World, msgs: list[dict[str, Any]]) -> Conn:
    """A fresh connection fed C{msgs}; an escaping exception propagates."""
    conn = world.open(random.Random(0))
    for m in msgs:
        conn.feed(fuzz.frame(m))
    return conn


@pytest.fixture
def supernode(tmp_path: Any) -> Iterator[World]:
    world = fuzz.make_world("supernode", str(tmp_path / "sn"))
    yield world
    world.close()


@pytest.fixture
def localapi(tmp_path: Any) -> Iterator[World]:
    world = fuzz.make_world("localapi", str(tmp_path / "api"))
    yield world
    world.close()


def test_regression_register_with_non_latin1_header_is_refused(supernode: World) -> None:
    """A register whose header line has a character outside latin-1 is refused (or closed), not a
    UnicodeEncodeError escaping dataReceived."""
    feed_all(supernode, [HELLO, {"op": "register", "req": 1, "url": fuzz.FILE_URL, "headers": ["X: \u2603"]}])


def test_regression_register_with_malformed_url_is_refused(supernode: World) -> None:
    """A register with a URL urlsplit rejects ("http://[::1") is refused, not a ValueError."""
    feed_all(supernode, [HELLO, {"op": "register", "req": 1, "url": "http://[::1"}])


def test_regression_register_with_surrogate_url_is_refused(supernode: World) -> None:
    """A register whose URL holds a lone surrogate (valid JSON: "\\ud800") is refused."""
    feed_all(supernode, [HELLO, {"op": "register", "req": 1, "url": fuzz.ORIGIN + "/\ud800"}])


def test_regression_surrogate_peer_id_is_refused(supernode: World) -> None:
    """A hello with a lone surrogate in the peer id is refused, or the later register works."""
    feed_all(supernode, [{"op": "hello", "peer": "\ud800", "port": 1}, {"op": "register", "req": 1, "url": fuzz.FILE_URL}])


def test_regression_local_api_download_with_malformed_url_fails_cleanly(localapi: World) -> None:
    """A dfget asking the local API for "http://[::1" gets a failure, not a ValueError escaping."""
    feed_all(localapi, [{"op": "download", "url": "http://[::1"}])


def test_regression_local_api_download_with_surrogate_url_fails_cleanly(localapi: World) -> None:
    """A dfget asking the local API for a URL with a lone surrogate gets a failure."""
    feed_all(localapi, [{"op": "download", "url": fuzz.ORIGIN + "/\ud800"}])


def test_regression_nack_with_bad_reason_still_finishes_the_request(tmp_path: Any) -> None:
    """A source that nacks with a non-string reason is a protocol error, and the request it
    answered still gets its (failed) result: a request never answered stalls the download."""
    world = fuzz.make_world("fetch", str(tmp_path / "fetch"))
    try:
        conn = world.open(random.Random(3))
        specs = conn.state["specs"]
        assert specs, "seed 3 gives at least one request"
        conn.feed(fuzz.frame({"op": "nack", "task": fuzz.FETCH_TASK, "piece": specs[0].piece, "reason": 5}))
        assert conn.errors and conn.closed
        conn.lose()
        assert world.finish(conn) == []
    finally:
        world.close()


def test_regression_have_range_costs_memory_per_claimed_piece(supernode: World) -> None:
    """One register frame claiming 300,000 pieces of a task whose size is not known yet must
    not make the supernode allocate per claimed piece (0-16777215 costs gigabytes)."""
    tracemalloc.start()
    try:
        conn = feed_all(supernode, [HELLO])
        tracemalloc.reset_peak()
        conn.feed(fuzz.frame({"op": "register", "req": 1, "url": fuzz.SILENT_URL, "have": "0-299999"}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak / 2**20:.0f} MiB for one 80-byte frame"


def test_regression_register_with_surrogate_identifier_is_refused(supernode: World) -> None:
    """A register whose identifier holds a lone surrogate (valid JSON: "\\ud800") is refused or
    handled, not a UnicodeEncodeError escaping dataReceived."""
    feed_all(supernode, [HELLO, {"op": "register", "req": 1, "url": fuzz.FILE_URL, "identifier": "\ud800"}])


def test_regression_local_api_download_with_surrogate_identifier_fails_cleanly(localapi: World) -> None:
    """A dfget asking the local API for a download whose identifier holds a lone surrogate gets
    a failure, not a UnicodeEncodeError escaping dataReceived."""
    feed_all(localapi, [{"op": "download", "url": fuzz.FILE_URL, "identifier": "\ud800"}])


def test_regression_local_api_download_with_surrogate_md5_fails_cleanly(localapi: World) -> None:
    """A dfget asking the local API for a download whose md5 is not 32 hex digits (here a lone
    surrogate) gets a failure, not a UnicodeEncodeError escaping dataReceived."""
    feed_all(localapi, [{"op": "download", "url": fuzz.FILE_URL, "md5": "\udfff"}])
