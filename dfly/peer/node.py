"""The peer node: downloads tasks through the swarm and shares what it holds.

One L{PeerNode} runs inside the peer daemon (and inside dfget when no daemon
is used).  It keeps a control link to a supernode, registers each task it
downloads, fetches the pieces the supernode assigns from the named sources,
reports every outcome at once, and serves held pieces to other peers through
its upload server until the task expires.

A download is done when every piece is held and the md5 of the assembled file
equals the supernode's file md5, and the user's md5 if one was given.  Until
then no result is handed out.  The file md5 is taken as the download goes: each
time the run of held pieces from the start of the file grows, that run is read
back (from the page cache, in a worker thread, one run at a time) into the
task's md5, so at the end only the last pieces remain to be hashed.

Relay (cut-through).  The supernode may assign a piece from a peer that is
still receiving it (C{"relay": true}); the fetch then asks with C{relay} too
and checks the slice as always.  On the serving side, L{PeerNode.relay_lookup}
answers such a C{get} for a piece being received at once: the slice frame and
header, then the bytes as the running request writes them, read back from the
data file through the request's L{GrowingRange}.  A C{get} that comes before
our own assignment (it travels another path) is answered the same way if the
task's length gives the piece's size: its range waits up to C{RELAY_GRACE}
seconds for the attempt to start and is handed to it; if none starts, or it
starts with another length, the range fails.  A range fails (and the
connections reading it are aborted) before any byte could be written over what
it has shown: a new attempt at a piece first marks the old one stale, which
fails its range; a reset, failed or removed task fails every range of its
store before the file goes.  It completes once the piece is held, and held
bytes are never written again.

Holding and revalidating.  A finished download stays in the store and is shared
until it expires.  The supernode says, with every description of a task
(C{fresh_ms}), how much longer it trusts the task's content version without
asking the origin; a request for a held file within that time is answered at
once.  After it, the request waits for one round trip: the node registers the
task again, and the supernode (revalidating with the origin if its own window
has run out) answers with the current generation.  The same generation: the held
file is served.  Another one: the held file is dropped and the new version is
downloaded for the waiting requests.  With no supernode link the held file is
served.  Tasks named by a content digest never change and are never revalidated.
After every reconnect a finished download is announced with C{"seed": true}:
that only offers its pieces to others, and never makes the supernode fetch or
revalidate anything.  A download the node drops (expired, evicted, or of a
content version that is gone) leaves its task, and an assignment for a task the
node has no download of is answered C{"not downloading"}, which the supernode
takes as leaving the task.

Damage on disk.  A held copy can change after it was verified (a disk, a
stray write).  Three things catch it.  (1) A downloader that got a slice from
us with another md5 says so (C{"kind": "md5"}); the supernode then sends us
C{check} with the piece's md5, and we hash that piece from disk off the
reactor thread (one check per piece, C{MAX_CHECKS} at once): a finished copy
that differs is dropped and its task left (L{PeerNode.drop_damaged}); a piece
of an unfinished download stops being held, the supernode hears C{lost}, and
it is fetched again (a new epoch for early copiers, the file md5 starts over).
(2) A request for a held file whose inode, size or mtime changed since it was
verified waits while the whole file is hashed again; a wrong copy is dropped
and downloaded again for it.  (3) A stream that finds a verified copy wrong
(L{dfly.peer.stream}) makes the node drop it, so the client's retry downloads
the file again.  A dropped copy with requests waiting starts over for them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.errors import (
    BadControlMessage,
    DflyError,
    DownloadTimeout,
    IntegrityError,
    NoSupernode,
    OriginError,
    PieceUnavailable,
    StorageError,
    TaskFailed,
)
from dfly.peer.fetch import PieceRequest, SourcePool
from dfly.peer.link import SupernodeLink
from dfly.peer.store import PeerStore
from dfly.pieces import TAIL, Layout, SliceHeader, check_piece_size
from dfly.ratelimit import make_bucket
from dfly.urls import (
    check_digest,
    check_url,
    credential_key,
    digest_scope,
    digest_task_id,
    filter_url,
    parse_header_lines,
    task_id_for,
)
from dfly.wire.framing import MAX_CONTROL
from dfly.wire.messages import (
    encode_ranges,
    get_bool,
    get_int,
    get_md5,
    get_opt_int,
    get_opt_str,
    get_str,
    get_task_id,
)
from dfly.wire.protocol import FramedProtocol, GrowingRange, SliceSource
from dfly.wire.serve import SliceServerSession

if TYPE_CHECKING:
    from dfly.peer.stream import BlobStream

Progress = Callable[[int, "int | None"], None]

# Seconds a relay get for a piece we have not started yet waits for our own attempt.
RELAY_GRACE = 3.0
# The reason of the fail answering an assignment for a task we have no download of; the
# supernode takes it as our leaving the task.
NOT_DOWNLOADING = "not downloading"
# Piece checks the supernode asked for that may run at once (each reads one piece, at most
# 15 MiB, in a worker thread); more are dropped until one ends.
MAX_CHECKS = 8


@dataclass
class DownloadRequest:
    """What a user asked for."""

    url: str
    headers: list[str] = field(default_factory=list)
    filters: list[str] = field(default_factory=list)
    md5: str | None = None
    identifier: str | None = None
    digest: str | None = None  # "sha256:<hex>": the content's own name (registry blobs)

    @property
    def task_id(self) -> str:
        if self.digest is not None:
            return digest_task_id(self.digest, digest_scope(self.url, self.headers))
        sign = self.md5 or self.identifier or ""
        return task_id_for(filter_url(self.url, self.filters), sign, credential_key(self.headers))


@dataclass
class DownloadResult:
    """A finished, verified download held in the peer's store."""

    task_id: str
    path: str
    length: int
    md5: str
    from_cdn: int
    from_peers: int
    seconds: float


def hash_range(path: str, offset: int, length: int, md5: Any) -> None:
    """Feed C{length} bytes of C{path} from C{offset} into C{md5} (run in a thread)."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise IntegrityError(f"{path} is shorter than expected")
            md5.update(chunk)
            left -= len(chunk)


@dataclass
class RelayWait:
    """Relay readers of a piece whose own attempt has not started yet."""

    feed: GrowingRange
    data_len: int
    timer: Any = None


class Download:
    """One task this node is fetching (or has fetched and now shares)."""

    def __init__(self, node: PeerNode, request: DownloadRequest) -> None:
        self.node = node
        self.request = request
        self.task_id = request.task_id
        self.state = "waiting"  # waiting -> registered -> verifying -> done | failed
        self.piece_size: int | None = None
        self.length: int | None = None
        self.piece_count: int | None = None
        self.file_md5: str | None = None
        self.running: dict[int, PieceRequest] = {}
        self.relay_waits: dict[int, RelayWait] = {}
        # Piece md5s the supernode sent after assigning a piece it was still receiving.
        self.piece_md5s: dict[int, str] = {}
        self.from_cdn = 0
        self.from_peers = 0
        self.started = node.clock()
        self.finished_at: float | None = None
        self.waiters: list[Deferred[DownloadResult]] = []
        self.listeners: list[Progress] = []
        # Called with no arguments whenever something a reader may wait for changed: task
        # info (size) arrived, a piece was verified, the task was reset, finished or failed.
        self.watchers: list[Callable[[], None]] = []
        self.req_id: int | None = None
        self.link_timer: Any = None
        self.md5 = hashlib.md5()
        self.hashed = 0  # pieces [0, hashed) are in self.md5
        self.held_run = 0  # pieces [0, held_run) are held (verified), so never written again
        self.hashing = False
        self.generation: str | None = None
        self.error: Exception | None = None
        self.epoch = 0  # bumped when the content version changes; late callbacks check it
        # Until when (node clock) the supernode trusts this content version without asking
        # the origin; a done download requested after that is revalidated first.
        self.trusted_until = float("-inf")
        self.revalidating = False  # done, and registered again to check the version
        self.rechecking = False  # done, and the held file changed on disk: hashed again

    @property
    def store(self) -> Any:
        return self.node.store.get(self.task_id)

    def notify(self) -> None:
        """Tell every watcher (in-order readers) that something changed."""
        for watcher in list(self.watchers):
            watcher()

    def prefix(self) -> int:
        """Bytes held contiguously from the start of the file."""
        store = self.store
        if store is None:
            return 0
        n = 0
        while n in store.have:
            n += 1
        return 0 if n == 0 else int(store.data_offset(n - 1) + store.have[n - 1])

    def received(self) -> int:
        store = self.store
        return store.size() if store is not None else 0

    def result(self) -> DownloadResult:
        store = self.store
        assert store is not None and self.length is not None and self.file_md5 is not None
        end = self.finished_at or self.node.clock()
        return DownloadResult(
            self.task_id, store.data_path, self.length, self.file_md5,
            self.from_cdn, self.from_peers, end - self.started,
        )


class PeerNode:
    """A peer's whole download and sharing logic, with its I/O injected."""

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        home: str,
        supernodes: list[tuple[str, int]],
        peer_id: str | None = None,
        advertise_host: str | None = None,
        expire: float = 600.0,
        stall_timeout: float = 30.0,
        link_timeout: float = 10.0,
        keepalive: float = 20.0,
        cache_limit: int = 0,
        min_rate: float = 256 * 1024,
        upload_rate: float = 0,
        download_rate: float = 0,
        hasher: Callable[[str, int, int, Any], Deferred[None]] | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: Callable[[], float] = reactor.seconds
        self.home = home
        self.peer_id = peer_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:12]}"
        self.advertise_host = advertise_host
        self.expire = expire
        self.cache_limit = cache_limit
        self.link_timeout = link_timeout
        self.store = PeerStore(home)
        # One bucket per direction for the whole host: every connection and task shares it.
        self.upload_bucket = make_bucket(reactor, upload_rate)
        self.download_bucket = make_bucket(reactor, download_rate)
        self.sources = SourcePool(
            reactor, stall_timeout=stall_timeout, min_rate=min_rate, download=self.download_bucket
        )
        self.link = SupernodeLink(
            reactor, supernodes, self._link_up, self._link_down, self._control, keepalive=keepalive
        )
        self.downloads: dict[str, Download] = {}
        self.upload_port = 0
        self._req = 0
        self._by_req: dict[int, Download] = {}
        self._hash_range = hasher or self._hash_in_thread
        self._expiry: Any = None
        self._orphaned: Any = None
        self._checks: set[tuple[str, int]] = set()  # (task, piece) being checked

    # -- lifecycle -----------------------------------------------------------
    def start(self, upload_port: int) -> None:
        self.upload_port = upload_port
        self.link.start()
        self._expiry = self.reactor.callLater(min(30.0, self.expire), self._expire_tick)

    def stop(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        if self._orphaned is not None and self._orphaned.active():
            self._orphaned.cancel()
        for dl in list(self.downloads.values()):
            self._fail(dl, DflyError("peer is shutting down"))
        self.link.stop()
        self.sources.close()
        self.store.close()

    # -- the API used by the local API and by dfget ----------------------------
    def download(self, request: DownloadRequest, progress: Progress | None = None) -> Deferred[DownloadResult]:
        """Fetch C{request} through the swarm; the Deferred fires once it is verified."""
        try:
            check_url(request.url)
            if request.digest is not None:
                check_digest(request.digest)
            parse_header_lines(request.headers)
            task_id = request.task_id
            size = len(json.dumps(self._register_msg(request, 0, "", None)))
        except (DflyError, UnicodeError, ValueError) as e:
            return fail(DflyError(str(e)))
        if size > MAX_CONTROL - 4096:
            return fail(DflyError(f"request too large ({size} bytes of URL and headers)"))
        dl = self.downloads.get(task_id)
        if dl is not None and dl.state == "done" and dl.store is not None:
            dl.store.last_access = self.clock()
            if not (dl.revalidating or dl.rechecking) and dl.store.file_stat() != dl.store.verified_stat:
                self._recheck(dl, request)
                dl = self.downloads.get(task_id)  # a damaged copy may be gone already
        if dl is not None and dl.state == "done" and dl.store is not None and not dl.rechecking:
            if not dl.revalidating and self._trusted(dl):
                if progress is not None:
                    progress(dl.received(), dl.length)
                return succeed(dl.result())
            if not dl.revalidating:
                self._revalidate(dl, request)
        if dl is None or dl.state == "failed":
            dl = self.downloads[task_id] = Download(self, request)
            self._register(dl)
        if progress is not None:
            dl.listeners.append(progress)

        def cancel(d: Deferred[DownloadResult]) -> None:
            if d in dl.waiters:
                dl.waiters.remove(d)
            if progress in dl.listeners:
                dl.listeners.remove(progress)
            if not dl.waiters and dl.state not in ("done", "failed"):
                self._fail(dl, DflyError("download cancelled"))

        d: Deferred[DownloadResult] = Deferred(cancel)
        dl.waiters.append(d)
        return d

    def _trusted(self, dl: Download) -> bool:
        """Whether a done download may be served without asking the supernode."""
        if dl.request.digest is not None or self.clock() < dl.trusted_until:
            return True  # named by its content, or still within the supernode's window
        if not self.link.connected:
            self._log.info(
                "no supernode to revalidate task {task_id} with; serving the copy held", task_id=dl.task_id
            )
            return True
        return False

    def _recheck(self, dl: Download, request: DownloadRequest) -> None:
        """The held file's identity (inode, size, mtime) changed since it was verified:
        hash it again before anyone is served from it.  The same md5: it is served (or
        revalidated) as before; another: the copy is dropped and downloaded again."""
        store = dl.store
        assert dl.length is not None  # done
        self._log.info("held file of task {task_id} changed on disk; verifying it again", task_id=dl.task_id)
        dl.rechecking = True
        stat = store.file_stat()
        md5 = hashlib.md5()
        d = self._hash_range(store.data_path, 0, dl.length, md5)

        def current() -> bool:
            return self.downloads.get(dl.task_id) is dl and dl.store is store and dl.rechecking

        def hashed(_: Any) -> None:
            if not current():
                return
            got = md5.hexdigest()
            if got != dl.file_md5:
                self.drop_damaged(dl.task_id, store, f"file md5 {got} is not the verified {dl.file_md5}")
                return
            dl.rechecking = False
            store.verified_stat = stat
            self._log.info("held file of task {task_id} verified again", task_id=dl.task_id)
            if dl.waiters:
                if self._trusted(dl):
                    self._serve_held(dl)
                else:
                    self._revalidate(dl, request)
            else:
                dl.notify()

        def failed(f: Failure) -> None:
            if current():
                self.drop_damaged(dl.task_id, store, f"cannot read it: {f.getErrorMessage()}")

        d.addCallbacks(hashed, failed)

    def drop_damaged(self, task_id: str, stored: Any, why: str) -> bool:
        """A reader proved the held, verified copy C{stored} of C{task_id} wrong (a digest
        mismatch, a short file): drop it, so that the next request downloads the file again.
        The task is left (the supernode stops offering the copy); requests waiting for it
        are served by a new download through the swarm.  False if C{stored} is not the
        finished copy held now (already dropped, or replaced)."""
        dl = self.downloads.get(task_id)
        if dl is None or stored is None or dl.store is not stored or dl.state != "done":
            return False
        self._log.warn(
            "held copy of task {task_id} is damaged ({why}); dropping it, it is downloaded again when asked for",
            task_id=task_id, why=why,
        )
        stored.damaged = True
        waiting = bool(dl.waiters)
        if waiting:
            self.link.send({"op": "leave", "task": task_id})  # the supernode forgets our pieces
        self._reset(dl)  # nobody waiting: dropped, and the task left
        if waiting and self.downloads.get(task_id) is dl:
            self._register(dl)
        return True

    def _revalidate(self, dl: Download, request: DownloadRequest) -> None:
        """Register a done download again: the answer says whether its version is current."""
        self._log.info("revalidating task {task_id} with the supernode", task_id=dl.task_id)
        dl.request = request  # the latest request's headers go to the origin
        dl.revalidating = True
        self._register(dl)

    def _serve_held(self, dl: Download) -> None:
        """The held copy of a revalidating download is the answer: hand it to the waiters."""
        dl.revalidating = False
        if dl.req_id is not None:
            self._by_req.pop(dl.req_id, None)
            dl.req_id = None
        store = dl.store
        if store is not None:
            store.last_access = self.clock()
        waiters, dl.waiters = dl.waiters, []
        listeners, dl.listeners = dl.listeners, []
        for listener in listeners:
            listener(dl.received(), dl.length)
        result = dl.result()
        for d in waiters:
            d.callback(result)
        dl.notify()

    def stream(
        self,
        request: DownloadRequest,
        offset: int = 0,
        end: int | None = None,
        expected_sha256: str | None = None,
    ) -> Deferred[BlobStream]:
        """Join (or start) the download of C{request} and read its bytes in order as they
        arrive: the Deferred fires with a L{BlobStream} of bytes [offset, end) once the size
        is known (see L{dfly.peer.stream}).  Cancelling it leaves the download running."""
        from dfly.peer.stream import open_stream

        return open_stream(self, request, offset, end, expected_sha256)

    def lease(self, task_id: str) -> None:
        store = self.store.get(task_id)
        if store is not None:
            store.leases += 1

    def release(self, task_id: str) -> None:
        store = self.store.get(task_id)
        if store is not None:
            store.leases = max(0, store.leases - 1)
            store.last_access = self.clock()

    def verified_prefix(self, task_id: str) -> tuple[str, int, int] | None:
        """(data path, bytes, epoch) of the run of held pieces from the start of C{task_id}'s
        file.  Those bytes passed their md5 check and are never written again while the
        epoch stays the same, so a client may copy them before the whole file is verified."""
        dl = self.downloads.get(task_id)
        store = dl.store if dl is not None else None
        if dl is None or store is None or dl.length is None or dl.revalidating or dl.rechecking:
            return None  # (a copy being revalidated or checked again may be about to go)
        return store.data_path, min(dl.length, store.data_offset(dl.held_run)), dl.epoch

    # -- supernode link ------------------------------------------------------
    def _link_up(self) -> None:
        if self._orphaned is not None and self._orphaned.active():
            self._orphaned.cancel()
        self._orphaned = None
        hello: dict[str, Any] = {"op": "hello", "peer": self.peer_id, "port": self.upload_port}
        if self.advertise_host:
            hello["host"] = self.advertise_host
        self.link.send(hello)
        for dl in list(self.downloads.values()):
            if dl.state != "failed":
                try:
                    # A finished file is announced, not requested: no fetch, no revalidation.
                    self._register(dl, seed=dl.state == "done" and not dl.revalidating)
                except DflyError as e:  # one bad entry must not keep the others unregistered
                    self._fail(dl, e)

    def _link_down(self) -> None:
        # Assignments from the lost supernode are void; pieces in flight may still finish.
        # If no supernode comes back in time, unfinished downloads fail (dfget then goes to
        # the origin) rather than waiting forever.
        if self._orphaned is None:
            self._orphaned = self.reactor.callLater(self.link_timeout, self._link_gone)
        # Requests waiting for a revalidation get the copy held: nobody can say it changed.
        for dl in list(self.downloads.values()):
            if dl.revalidating:
                self._serve_held(dl)

    def _link_gone(self) -> None:
        self._orphaned = None
        if self.link.connected:
            return
        error = NoSupernode(f"lost the supernode and could not reconnect within {self.link_timeout:g} s")
        for dl in list(self.downloads.values()):
            if dl.state not in ("done", "failed"):
                self._fail(dl, error, leave=False)

    def _register(self, dl: Download, seed: bool = False) -> None:
        self._req += 1
        if dl.req_id is not None:
            self._by_req.pop(dl.req_id, None)
        dl.req_id = self._req
        self._by_req[self._req] = dl
        store = dl.store
        have = encode_ranges(set(store.have)) if store is not None else ""
        msg = self._register_msg(dl.request, dl.req_id, have, dl.generation)
        if seed:
            msg["seed"] = True
        if not self.link.send(msg) and dl.link_timer is None and dl.state == "waiting":
            dl.link_timer = self.reactor.callLater(self.link_timeout, self._no_link, dl)

    @staticmethod
    def _register_msg(request: DownloadRequest, req: int, have: str, generation: str | None) -> dict[str, Any]:
        return {
            "op": "register",
            "req": req,
            "url": request.url,
            "filter": request.filters,
            "headers": request.headers,
            "md5": request.md5,
            "identifier": request.identifier,
            "have": have,
            "generation": generation,
            **({"digest": request.digest} if request.digest is not None else {}),
        }

    def _no_link(self, dl: Download) -> None:
        dl.link_timer = None
        if dl.state == "waiting" and not self.link.connected:
            self._fail(dl, NoSupernode(self.link.last_error or "no supernode reachable"))

    def _control(self, msg: dict[str, Any]) -> None:
        op = msg["op"]
        if op in ("welcome", "pong"):
            return
        if op in ("registered", "refused"):
            dl = self._by_req.pop(get_int(msg, "req"), None)
            if dl is None:
                return
            if dl.link_timer is not None and dl.link_timer.active():
                dl.link_timer.cancel()
            dl.link_timer = None
            if op == "refused":
                self._fail(dl, DflyError(get_opt_str(msg, "reason", 2048) or "refused"))
                return
            if dl.state == "waiting":
                dl.state = "registered"
            if dl.revalidating:
                self._revalidated(dl, msg)
                return
            self._task_info(dl, msg)
            return
        if op == "check":
            self._check_piece(msg)
            return
        task_id = get_task_id(msg)
        dl = self.downloads.get(task_id)
        if op == "task_info":
            if dl is not None:
                self._task_info(dl, msg)
        elif op == "task_failed":
            if dl is not None and dl.state != "done":
                self._fail(dl, task_error(msg), leave=False)
        elif op == "assign":
            self._assign(dl, msg)
        elif op == "piece_md5":
            piece, md5 = get_int(msg, "piece", 0, 1 << 24), get_md5(msg, "md5")
            if dl is not None and dl.state == "registered":
                self._piece_md5(dl, piece, md5)
        elif op == "task_reset":
            if dl is not None:
                self._log.info("task {task_id} changed at the origin; starting over", task_id=task_id)
                self._reset(dl)
                if self.downloads.get(task_id) is dl:
                    self._register(dl)
        else:
            raise BadControlMessage(f"unknown op {op!r} from the supernode")

    # -- checks of held pieces -------------------------------------------------
    def _check_piece(self, msg: dict[str, Any]) -> None:
        """The supernode asks us to check a piece we hold: a downloader got it from us with
        another md5.  It is read back from disk off the reactor thread; a damaged copy is
        dropped (L{_piece_checked}).  A check that names nothing we hold, or one for a
        piece being checked already, is ignored; so is a malformed one (it is advice, not
        worth the link)."""
        try:
            task_id = get_task_id(msg)
            piece = get_int(msg, "piece", 0, 1 << 24)
            md5 = get_md5(msg, "md5")
        except BadControlMessage as e:
            self._log.info("ignoring a malformed check from the supernode: {error}", error=str(e))
            return
        dl = self.downloads.get(task_id)
        store = self.store.get(task_id)
        if dl is None or store is None or dl.store is not store or piece not in store.have:
            return
        key = (task_id, piece)
        if key in self._checks:
            return
        if len(self._checks) >= MAX_CHECKS:
            self._log.info(
                "{n} piece checks running; not checking piece {piece} of {task_id}",
                n=len(self._checks), piece=piece, task_id=task_id,
            )
            return
        self._checks.add(key)
        data_len = store.have[piece]
        hasher = hashlib.md5(SliceHeader(data_len, store.piece_size).encode())
        d = self._hash_range(store.data_path, store.data_offset(piece), data_len, hasher)

        def hashed(_: Any) -> None:
            hasher.update(TAIL)
            self._piece_checked(dl, store, piece, data_len, md5, hasher.hexdigest())

        def failed(f: Failure) -> None:
            unreadable = f.check(IntegrityError, FileNotFoundError) or (
                isinstance(f.value, OSError) and f.value.errno == errno.EIO
            )
            if unreadable:
                self._piece_checked(dl, store, piece, data_len, md5, f"unreadable ({f.getErrorMessage()})")
            else:
                self._log.warn(
                    "cannot check piece {piece} of {task_id}: {error}",
                    piece=piece, task_id=task_id, error=f.getErrorMessage(),
                )

        def end(result: Any) -> Any:
            self._checks.discard(key)
            return result

        d.addBoth(end)
        d.addCallbacks(hashed, failed)
        d.addErrback(lambda f: self._log.failure("checking piece {piece} of {task_id} failed", f, piece=piece, task_id=task_id))

    def _piece_checked(self, dl: Download, store: Any, piece: int, data_len: int, md5: str, got: str) -> None:
        """What a check read back: the same md5 changes nothing; another drops our copy of
        the piece (a finished file: all of it)."""
        if self.downloads.get(dl.task_id) is not dl or dl.store is not store or store.have.get(piece) != data_len:
            return  # the copy checked is gone or changed meanwhile
        if got == md5:
            self._log.info(
                "piece {piece} of {task_id} checks out on disk (md5 {md5}); keeping it",
                piece=piece, task_id=dl.task_id, md5=md5,
            )
            return
        why = f"piece {piece} on disk has md5 {got}, not {md5}"
        if dl.state == "done":
            self.drop_damaged(dl.task_id, store, why)
            return
        self._log.warn(
            "piece {piece} of {task_id} is damaged on disk ({why}); fetching it again",
            piece=piece, task_id=dl.task_id, why=why,
        )
        self._unhold(dl, piece)

    def _unhold(self, dl: Download, piece: int) -> None:
        """A held piece of an unfinished download is damaged: not held any more, and the
        supernode hears of it (C{lost}) and assigns it again."""
        store = dl.store
        store.unmark(piece)
        if piece < dl.held_run:
            # Readers may have taken these bytes as final, and the file md5 covers them or
            # is being taken over them: a new epoch, and the hash starts over.
            dl.held_run = piece
            dl.epoch += 1
            dl.md5, dl.hashed, dl.hashing = hashlib.md5(), 0, False
        if dl.state == "verifying":
            dl.state = "registered"
        self.link.send({"op": "lost", "task": dl.task_id, "piece": piece})
        dl.notify()
        self._advance_hash(dl)

    def _piece_md5(self, dl: Download, piece: int, md5: str) -> None:
        """The supernode announces the md5 of a piece it assigned before it was whole."""
        if dl.piece_count is not None and piece >= dl.piece_count:
            return
        dl.piece_md5s[piece] = md5
        req = dl.running.get(piece)
        if req is None or req.awaiting is None:
            if req is not None and req.md5 is None:
                req.md5 = md5  # still arriving: checked when whole (by the parser if not begun)
            return
        source_id, tag = req.awaiting
        req.awaiting = None
        self._piece_result(dl, req, source_id, self._check_late_md5(req, md5), tag)
        req.settle()

    @staticmethod
    def _check_late_md5(req: PieceRequest, md5: str) -> str | None:
        """Compare a slice received before its md5 was known with that md5."""
        req.md5, req.unchecked = md5, False
        if req.digest == md5:
            return None
        req.cut()
        req.mismatch = True
        return f"slice md5 {req.digest} is not the announced {md5}"

    def _revalidated(self, dl: Download, msg: dict[str, Any]) -> None:
        """The supernode's answer to the registration of a done download being revalidated."""
        generation = get_opt_str(msg, "generation", 64)
        if generation is not None and generation == dl.generation and get_opt_str(msg, "state", 32) != "failed":
            self._task_info(dl, msg)
            if self.downloads.get(dl.task_id) is dl and dl.state == "done":
                self._serve_held(dl)
            return
        # Another version (or one not known yet): what is held is not the current file.
        self._log.info("task {task_id} changed at the origin; downloading the new version", task_id=dl.task_id)
        self._reset(dl)
        if self.downloads.get(dl.task_id) is dl:
            self._task_info(dl, msg)

    def _reset(self, dl: Download) -> None:
        """Forget everything held for C{dl}: the content it belongs to is gone.  A finished
        download nobody waits for is dropped (and leaves its task); any other starts over."""
        for req in dl.running.values():
            req.stale = True
        dl.running.clear()
        dl.piece_md5s.clear()
        self._drop_relay_waits(dl)
        self.store.remove(dl.task_id)
        dl.revalidating = dl.rechecking = False
        dl.trusted_until = float("-inf")
        if dl.state == "done" and not dl.waiters:
            if self.downloads.get(dl.task_id) is dl:
                del self.downloads[dl.task_id]
                self.link.send({"op": "leave", "task": dl.task_id})
            dl.notify()
            return
        if dl.state == "done":  # requests wait for the new version
            dl.state = "registered"
            dl.started = self.clock()
            dl.finished_at = None
        dl.epoch += 1
        dl.piece_size = dl.length = dl.piece_count = None
        dl.file_md5 = dl.generation = None
        dl.md5, dl.hashed, dl.hashing = hashlib.md5(), 0, False
        dl.held_run = 0
        dl.from_cdn = dl.from_peers = 0
        if dl.state == "verifying":
            dl.state = "registered"
        dl.notify()

    def _task_info(self, dl: Download, msg: dict[str, Any]) -> None:
        state = get_opt_str(msg, "state", 32)
        if state == "failed":
            self._fail(dl, task_error(msg), leave=False)
            return
        generation = get_opt_str(msg, "generation", 64)
        if generation is not None and dl.generation not in (None, generation):
            self._log.info("task {task_id} is a new version; dropping what was held", task_id=dl.task_id)
            self._reset(dl)
            if self.downloads.get(dl.task_id) is not dl:
                return
        if generation is not None:
            dl.generation = generation
            fresh = get_opt_int(msg, "fresh_ms", 0, 1 << 40)
            if fresh is not None:
                dl.trusted_until = self.clock() + fresh / 1000.0
        piece_size = get_opt_int(msg, "piece_size", 1, 1 << 30)
        if piece_size is not None and dl.piece_size is None:
            try:
                dl.piece_size = check_piece_size(piece_size)
            except ValueError as e:
                raise BadControlMessage(str(e)) from None
            try:
                self.store.open(dl.task_id, dl.piece_size, self.clock())
            except OSError as e:
                self._fail(dl, StorageError(f"cannot create the task's store: {e.strerror or e}"))
                return
        length = get_opt_int(msg, "length")
        if length is not None:
            dl.length = length
        count = get_opt_int(msg, "piece_count", 1, 1 << 24)
        if count is not None:
            dl.piece_count = count
        if msg.get("md5"):
            dl.file_md5 = get_md5(msg, "md5")
        dl.notify()
        self._check_complete(dl)

    def _assign(self, dl: Download | None, msg: dict[str, Any]) -> None:
        task_id = get_task_id(msg)
        piece = get_int(msg, "piece", 0, 1 << 24)
        raw_source = msg.get("source")
        if raw_source == "cdn":
            source_id = "cdn"
            if self.link.address is None:
                return
            host, port = self.link.address
        elif isinstance(raw_source, dict):
            source_id = get_str(raw_source, "id", 200)
            host = get_str(raw_source, "host", 255)
            port = get_int(raw_source, "port", 1, 65535)
        else:
            raise BadControlMessage("assign: bad source")
        # The attempt number goes back with the result, so that the supernode can tell it
        # from a report on an earlier, withdrawn attempt at the same piece and source.
        attempt = get_opt_int(msg, "attempt", 0, 1 << 62)
        tag = {} if attempt is None else {"attempt": attempt}
        store = self.store.get(task_id)
        if dl is None or dl.state not in ("registered", "verifying", "done") or dl.piece_size is None or store is None:
            # No download of the task here: the supernode takes this as our leaving it.
            self.link.send(
                {"op": "fail", "task": task_id, "piece": piece, "source": source_id, "reason": NOT_DOWNLOADING, **tag}
            )
            return
        if get_int(msg, "piece_size") != dl.piece_size:
            raise BadControlMessage("assign: piece size changed")
        data_len = get_int(msg, "len", 0, dl.piece_size - 5)
        relay = get_bool(msg, "relay")
        md5: str | None
        if msg.get("md5") is None and relay:
            md5 = dl.piece_md5s.get(piece)  # a piece still arriving: its md5 follows (piece_md5)
        else:
            md5 = get_md5(msg, "md5")
        if piece in store.have:
            self.link.send({"op": "done", "task": task_id, "piece": piece, "source": source_id, **tag})
            return
        if dl.state != "registered":  # verifying or done: every piece of the task is held
            self.link.send(
                {"op": "fail", "task": task_id, "piece": piece, "source": source_id, "reason": NOT_DOWNLOADING, **tag}
            )
            return
        old = dl.running.get(piece)
        if old is not None:
            old.stale = True

        def result(req: PieceRequest, error: str | None) -> None:
            self._piece_result(dl, req, source_id, error, tag)

        req = PieceRequest(store, piece, data_len, md5, result, relay=relay)
        wait = dl.relay_waits.pop(piece, None)
        if wait is not None:
            if wait.timer is not None and wait.timer.active():
                wait.timer.cancel()
            if wait.data_len == data_len:
                req.feed = wait.feed
            else:
                wait.feed.fail()  # its readers were promised another length
        dl.running[piece] = req
        self.sources.fetch(host, port, req)

    def _piece_result(
        self, dl: Download, req: PieceRequest, source_id: str, error: str | None, tag: dict[str, int]
    ) -> None:
        current = dl.running.get(req.piece) is req
        if req.unchecked and error is None and req.local_error is None and current and dl.state == "registered":
            md5 = req.md5 or dl.piece_md5s.get(req.piece)
            if md5 is None:
                # Whole, but its md5 is not announced yet: it stays running until it is.
                req.awaiting = (source_id, tag)
                return
            error = self._check_late_md5(req, md5)
        if current:
            del dl.running[req.piece]
        if dl.state != "registered":
            return
        report = {"task": dl.task_id, "piece": req.piece, "source": source_id, **tag}
        if req.local_error is not None:
            self._fail(dl, StorageError(req.local_error))
            return
        if error is not None:
            self._log.warn(
                "piece {piece} of {task_id} from {source} failed: {error}",
                piece=req.piece, task_id=dl.task_id, source=source_id, error=error,
            )
            kind = {"kind": "md5"} if req.mismatch else {}
            self.link.send({"op": "fail", "reason": error[:1000], **report, **kind})
            return
        req.task.mark(req.piece, req.data_len)
        while dl.held_run in req.task.have:
            dl.held_run += 1
        if source_id == "cdn":
            dl.from_cdn += req.data_len
        else:
            dl.from_peers += req.data_len
        self.link.send({"op": "done", **report})
        received = dl.received()
        for listener in list(dl.listeners):
            listener(received, dl.length)
        dl.notify()
        self._advance_hash(dl)
        self._check_complete(dl)

    # -- completion ------------------------------------------------------------
    def _advance_hash(self, dl: Download) -> None:
        """Hash the next run of held pieces, if there is one and no run is being hashed."""
        store = dl.store
        if dl.hashing or store is None or dl.state not in ("registered", "verifying"):
            return
        end = dl.hashed
        while end in store.have:
            end += 1
        if end == dl.hashed:
            return
        start = dl.hashed
        length = sum(store.have[p] for p in range(start, end))
        dl.hashing = True
        epoch = dl.epoch
        d = self._hash_range(store.data_path, store.data_offset(start), length, dl.md5)

        def hashed(_: Any) -> None:
            if dl.epoch != epoch:
                return
            dl.hashing = False
            dl.hashed = end
            self._advance_hash(dl)
            self._check_complete(dl)

        def failed(f: Failure) -> None:
            if dl.epoch == epoch:
                self._verify_error(f, dl)

        d.addCallbacks(hashed, failed)

    def _check_complete(self, dl: Download) -> None:
        store = dl.store
        if (
            dl.state not in ("registered", "verifying")
            or store is None
            or dl.piece_count is None
            or dl.file_md5 is None
            or dl.length is None
            or len(store.have) < dl.piece_count
        ):
            return
        if dl.state == "registered":
            dl.state = "verifying"
            if store.size() != dl.length:
                self._fail(dl, IntegrityError(f"assembled {store.size()} bytes, expected {dl.length}"))
                return
        if dl.hashing or dl.hashed < dl.piece_count:
            self._advance_hash(dl)
            return
        self._verified(dl.md5.hexdigest(), dl)

    def _verified(self, md5: str, dl: Download) -> None:
        if dl.state != "verifying":
            return
        wanted = [m for m in (dl.file_md5, dl.request.md5) if m]
        if any(md5 != m for m in wanted):
            self._fail(dl, IntegrityError(f"file md5 {md5} does not match {' / '.join(wanted)}"))
            return
        dl.state = "done"
        dl.finished_at = self.clock()
        store = dl.store
        store.complete = True
        store.last_access = self.clock()
        store.verified_stat = store.file_stat()
        self._log.info(
            "task {task_id} done: {length} bytes in {seconds:.2f} s, {cdn} from the supernode, {peers} from peers",
            task_id=dl.task_id, length=dl.length, seconds=dl.finished_at - dl.started,
            cdn=dl.from_cdn, peers=dl.from_peers,
        )
        waiters, dl.waiters = dl.waiters, []
        dl.listeners.clear()
        result = dl.result()
        for d in waiters:
            d.callback(result)
        dl.notify()
        self.collect_garbage()

    def collect_garbage(self) -> list[str]:
        """Drop finished, unleased files, least recently used first, above the cache limit."""
        if not self.cache_limit:
            return []
        total = sum(t.size() for t in self.store.tasks.values())
        done = [dl for dl in self.downloads.values() if dl.state == "done" and dl.store is not None and not dl.waiters]
        evicted = []
        for dl in sorted(done, key=lambda d: d.store.last_access):
            if total <= self.cache_limit:
                break
            if dl.store.leases:
                continue
            total -= dl.store.size()
            self._log.info("dropping task {task_id} to stay under the cache limit", task_id=dl.task_id)
            self.link.send({"op": "leave", "task": dl.task_id})
            del self.downloads[dl.task_id]
            self.store.remove(dl.task_id)
            evicted.append(dl.task_id)
        return evicted

    def _verify_error(self, f: Failure, dl: Download) -> None:
        self._fail(dl, IntegrityError(f"cannot verify the assembled file: {f.getErrorMessage()}"))

    def _hash_in_thread(self, path: str, offset: int, length: int, md5: Any) -> Deferred[None]:
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), hash_range, path, offset, length, md5)

    def _fail(self, dl: Download, error: Exception, leave: bool = True) -> None:
        if dl.state == "failed":
            return
        dl.state = "failed"
        if dl.req_id is not None:
            self._by_req.pop(dl.req_id, None)
        if dl.link_timer is not None and dl.link_timer.active():
            dl.link_timer.cancel()
        dl.link_timer = None
        for req in dl.running.values():
            req.stale = True
        dl.running.clear()
        self._drop_relay_waits(dl)
        if leave:
            self.link.send({"op": "leave", "task": dl.task_id})
        if self.downloads.get(dl.task_id) is dl:
            del self.downloads[dl.task_id]
        self.store.remove(dl.task_id)
        waiters, dl.waiters = dl.waiters, []
        dl.listeners.clear()
        dl.error = error
        for d in waiters:
            d.errback(Failure(error))
        dl.notify()

    # -- sharing ---------------------------------------------------------------
    def upload_session(self, wire: FramedProtocol) -> SliceServerSession:
        """A session of the upload server: held pieces, and pieces being received for relay gets."""
        return SliceServerSession(wire, self.lookup, self.relay_lookup)

    def lookup(self, task_id: str, piece: int, who: str) -> Any:
        result = self.store.lookup(task_id, piece, who)
        stored = self.store.get(task_id)
        if stored is not None:
            stored.last_access = self.clock()
        return result

    def relay_lookup(self, task_id: str, piece: int, who: str) -> tuple[SliceSource, int, int]:
        """The answer to a relay get: a held piece as L{lookup}; else the piece our running
        request is receiving, or, if our attempt has not started but the task's length gives
        the piece's size, one that waits up to C{RELAY_GRACE} for it; else L{PieceUnavailable}."""
        try:
            result: tuple[SliceSource, int, int] = self.lookup(task_id, piece, who)
            return result
        except PieceUnavailable:
            dl = self.downloads.get(task_id)
            store = dl.store if dl is not None else None
            if dl is None or store is None or dl.state != "registered":
                raise
        req = dl.running.get(piece)
        # A request still receiving, or whole and waiting for its md5 (then readers wait too).
        open_ = req is not None and (not req.finished or req.awaiting is not None)
        if req is not None and open_ and not req.stale and req.local_error is None:
            task = req.task  # the file the attempt writes to
            if req.feed is None:
                req.feed = task.follow()
                req.feed.grew(req.received)
            return task.slice_source(piece, req.data_len, req.feed), task.piece_size, req.data_len
        wait = dl.relay_waits.get(piece)
        if wait is None:
            if dl.length is None:
                raise PieceUnavailable(f"piece {piece} is neither held nor being received here")
            layout = Layout(dl.length, store.piece_size)
            if piece >= layout.count:
                raise PieceUnavailable(f"piece {piece} is not part of the task")
            wait = RelayWait(store.follow(), layout.data_len(piece))
            wait.timer = self.reactor.callLater(RELAY_GRACE, self._relay_unstarted, dl, piece, wait)
            dl.relay_waits[piece] = wait
        return store.slice_source(piece, wait.data_len, wait.feed), store.piece_size, wait.data_len

    def _relay_unstarted(self, dl: Download, piece: int, wait: RelayWait) -> None:
        if dl.relay_waits.get(piece) is not wait:
            return
        del dl.relay_waits[piece]
        self._log.info(
            "no attempt at piece {piece} of {task_id} within {grace:g} s; cutting off its relay readers",
            piece=piece, task_id=dl.task_id, grace=RELAY_GRACE,
        )
        wait.feed.fail()

    @staticmethod
    def _drop_relay_waits(dl: Download) -> None:
        waits = list(dl.relay_waits.values())
        dl.relay_waits.clear()
        for wait in waits:
            if wait.timer is not None and wait.timer.active():
                wait.timer.cancel()
            wait.feed.fail()

    def _expire_tick(self) -> None:
        now = self.clock()
        try:
            for task_id, dl in list(self.downloads.items()):
                store = dl.store
                if (
                    dl.state == "done" and store is not None and not store.leases and not dl.waiters
                    and now - store.last_access >= self.expire
                ):
                    self._log.info("task {task_id} expired; no longer shared", task_id=task_id)
                    self.link.send({"op": "leave", "task": task_id})
                    del self.downloads[task_id]
                    self.store.remove(task_id)
        except Exception:
            self._log.failure("expiry pass failed")
        self._expiry = self.reactor.callLater(min(30.0, self.expire), self._expire_tick)


def task_error(msg: dict[str, Any]) -> DflyError:
    """The error a C{task_failed} (or a failed C{task_info}) stands for."""
    reason = get_opt_str(msg, "reason", 2048) or "the supernode could not fetch the file"
    kind = get_opt_str(msg, "kind", 64)
    if kind == "IntegrityError":
        return IntegrityError(reason)
    if kind == "StorageError":
        return TaskFailed(f"supernode: {reason}")
    if kind == "DownloadTimeout":
        return DownloadTimeout(reason)
    return OriginError(reason, get_opt_int(msg, "status", 0, 999))


def stats_line(result: DownloadResult) -> dict[str, Any]:
    """A JSON-able summary of a result."""
    return {
        "task": result.task_id,
        "length": result.length,
        "md5": result.md5,
        "seconds": round(result.seconds, 3),
        "from_supernode": result.from_cdn,
        "from_peers": result.from_peers,
    }



