"""The supernode's HTTP API (read-only JSON)."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from dfly import __version__
from dfly.supernode.service import Supernode


class _Json(Resource):
    isLeaf = True

    def __init__(self, node: Supernode) -> None:
        super().__init__()
        self.node = node

    def send(self, request: Request, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=1).encode() + b"\n"


class TasksResource(_Json):
    """C{GET /api/v1/tasks} and C{GET /api/v1/tasks/<id>}."""

    def render_GET(self, request: Request) -> bytes:
        postpath = [p for p in request.postpath or [] if p]
        tasks = self.node.describe()
        if not postpath:
            return self.send(request, 200, {"tasks": tasks})
        wanted = postpath[0].decode("ascii", "replace")
        for task in tasks:
            if task["id"] == wanted:
                return self.send(request, 200, task)
        return self.send(request, 404, {"error": "no such task"})


class HealthResource(_Json):
    """C{GET /healthz}: liveness and a few counters."""

    def render_GET(self, request: Request) -> bytes:
        return self.send(
            request,
            200,
            {"ok": True, "version": __version__, "tasks": len(self.node.tasks), "peers": len(self.node.sessions)},
        )


def make_api(node: Supernode) -> Resource:
    """The root resource of the supernode API."""
    root = Resource()
    api = Resource()
    v1 = Resource()
    root.putChild(b"api", api)
    api.putChild(b"v1", v1)
    v1.putChild(b"tasks", TasksResource(node))
    root.putChild(b"healthz", HealthResource(node))
    return root
