"""The OpenAPI 3.1 document: served, self-consistent, and true to the app's routes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from fdqueue.api import ADMIN_ROUTES, create_app
from fdqueue.config import Settings
from fdqueue.models import TicketIn
from fdqueue.openapi import openapi_document

METHODS = {"get", "post", "put", "patch", "delete", "options", "head"}


def _settings(db_url: str = "postgresql://nobody@127.0.0.1:9/none") -> Settings:
    return Settings(database_url=db_url, freshdesk_domain=None, freshdesk_base_url=None)


def app_routes(app: web.Application) -> dict[tuple[str, str], str | None]:
    """(method, path pattern) → route name of every route; HEAD is implied by GET."""
    routes: dict[tuple[str, str], str | None] = {}
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        routes[(route.method.lower(), route.resource.canonical)] = route.name
    return routes


def document_operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    }


def test_every_route_is_documented_and_every_documented_route_exists() -> None:
    """The app's routes and the document's operations are the same set."""
    routes = app_routes(create_app(_settings()))
    assert set(routes) == set(document_operations(openapi_document()))


def test_admin_routes_declare_the_bearer_scheme_and_others_do_not() -> None:
    """Exactly the admin-guarded routes carry `security` in the document."""
    routes = app_routes(create_app(_settings()))
    operations = document_operations(openapi_document())
    for key, name in routes.items():
        assert ("security" in operations[key]) is (name in ADMIN_ROUTES), key


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_document_is_well_formed_openapi_3_1() -> None:
    """Version, unique operation ids, resolvable refs, path parameters declared."""
    document = openapi_document()
    assert document["openapi"].startswith("3.1")
    operations = document_operations(document)
    ids = [operation["operationId"] for operation in operations.values()]
    assert len(ids) == len(set(ids))
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[1] in schemas, ref
    for (_, path), operation in operations.items():
        assert operation["responses"], path
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == {part[1:-1] for part in path.split("/") if part.startswith("{")}


def test_ticket_schema_covers_every_intake_field() -> None:
    """The request body schema lists exactly TicketIn's fields and forbids others."""
    schema = openapi_document()["components"]["schemas"]["TicketIn"]
    assert set(schema["properties"]) == set(TicketIn.model_fields)
    assert schema["additionalProperties"] is False
    assert {"subject", "description"} <= set(schema["required"])
    priority_names = schema["properties"]["priority"]["oneOf"][1]["enum"]
    assert "urgent" in priority_names


async def test_document_is_served(db_url: str, pool: asyncpg.Pool) -> None:
    """GET /api/openapi.json serves the same document as JSON."""
    async with TestClient(TestServer(create_app(_settings(db_url), pool=pool))) as client:
        response = await client.get("/api/openapi.json")
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == openapi_document()
