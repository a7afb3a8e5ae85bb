"""The one object a proxied request is while its stages run (router/stages.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from router.auth import Principal
from router.limits import Ticket, Used
from router.routing.dispatch import Opened
from router.routing.table import Backend, Route
from router.runtime import Runtime
from router.sessions import Session
from router.state import FACTS, PRINCIPAL, REQUEST_ID, RUNTIME_NOW, Facts
from router.store.base import SessionQuery


@dataclass(slots=True, eq=False)
class Call:
    """A request to an upstream endpoint, from its parsed body to its relayed answer. The
    first six fields are known when it starts; each stage reads what the stages before it
    set and sets its own part (noted beside each field)."""

    request: web.Request
    runtime: Runtime  # the config and its runtime, read once at the request's start
    principal: Principal
    request_id: str
    facts: Facts  # what the access log and the request's metrics say about it
    endpoint: str  # "chat", "responses", "embeddings", "completions"
    body: dict[str, Any] = field(default_factory=dict)  # Read: validated, as the client sent it
    stream: bool = False  # Read
    model: str | None = None  # Read (the body's), else ReadSession (the user's default)
    session: Session | None = None  # BeginSession, then the other session stages (chat only)
    # AskPrevious: the pin of the response a new response continues, asked with the admission
    previous: SessionQuery | None = None
    ticket: Ticket | None = None  # Admit: None when the principal has no limits
    headers: dict[str, str] = field(default_factory=dict)  # what the answer carries
    route: Route | None = None  # Read (a model named in the body), else ChooseRoute
    prefer: Backend | None = None  # PlaceSession: the backend to ask first
    opened: Opened | None = None  # Forward: the committed upstream answer

    @classmethod
    def of(cls, request: web.Request, endpoint: str) -> Call:
        facts = request[FACTS]
        facts.endpoint = endpoint
        return cls(request, request[RUNTIME_NOW], request[PRINCIPAL], request[REQUEST_ID],
                   facts, endpoint)

    def used(self) -> Used | None:
        """What the request used, for its limits: nothing if no answer came."""
        opened = self.opened
        return None if opened is None else Used(opened.tokens, opened.relayed())
