"""The web playground at `/` of `tokenmill serve`: chat with the model from a browser.

One self-contained HTML file (inline CSS and JavaScript, shipped as package data): no build step,
and the page fetches nothing but this server's own API, by relative URLs so that it works behind
`--root-path` too. It streams `/v1/chat/completions`, takes a system prompt and sampling
settings, and shows the engine's live metrics from `/metrics`. With `--api-key`, the page asks
for the key and sends it with each call; the page itself is served without one (it holds no data).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PLAYGROUND_PATHS = frozenset({"/", "/playground"})


@lru_cache(maxsize=1)
def playground_html() -> str:
    return resources.files(__package__).joinpath("index.html").read_text(encoding="utf-8")


def add_playground_routes(app: FastAPI) -> None:
    async def page() -> HTMLResponse:
        # no-store: an upgraded server's page is never mixed with a cached older one.
        return HTMLResponse(playground_html(), headers={"Cache-Control": "no-store"})

    for path in sorted(PLAYGROUND_PATHS):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)
