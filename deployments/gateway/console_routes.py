"""The web console: one static page at `/` with its script and style, and `/rollout`, the rollout state it shows.

The page's files are read once, at import; no build step, nothing fetched from elsewhere. `/` and
`/console/{name}` are public (the page asks for the API key itself); `/rollout` needs the key, like every
route but the probes (the gateway's HTTP guard enforces it).

No `from __future__ import annotations` here: FastAPI must see real annotation objects.
"""

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.gateway.services import Services

logger = logging.getLogger("rag.console")
router = APIRouter()

_DIRECTORY = Path(__file__).parent / "console"
# Everything the page loads comes from this origin: no inline script or style to allow, no frames. So a
# script injected through a document's text cannot run, and no other site can frame the page to trick a
# click (the key sits in this origin's localStorage).
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_HEADERS = {"cache-control": "no-cache", "content-security-policy": _CSP, "x-frame-options": "DENY",
            "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}
_ASSET_TYPES = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_INDEX = (_DIRECTORY / "index.html").read_text(encoding="utf-8")
_ASSETS = {name: ((_DIRECTORY / name).read_bytes(), media) for name, media in _ASSET_TYPES.items()}
# The config texts from before the rollout and of its target: large, and not the console's business.
_HIDDEN_KEYS = ("before", "target")


@router.get("/", include_in_schema=False)
async def console_page() -> HTMLResponse:
    return HTMLResponse(_INDEX, headers=_HEADERS)


@router.get("/console/{name}", include_in_schema=False)
async def console_asset(name: str) -> Response:
    asset = _ASSETS.get(name)
    if asset is None:
        raise StarletteHTTPException(404, f"no console file {name[:80]!r}")
    data, media = asset
    return Response(data, media_type=media, headers=_HEADERS)


@router.get("/rollout")
async def rollout_state(services: Services) -> dict[str, Any]:
    """The rollout state file as `rollout start` last wrote it (without the config text it restores on a
    rollback); `{"status": "none"}` when no rollout was ever started, `{"status": "unreadable"}` when the
    file cannot be read."""
    return read_rollout_state(services.rollout_state_file)


def read_rollout_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"status": "none"}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        logger.warning("event=ROLLOUT_STATE_UNREADABLE path=%s error=%r", path, exc)
        return {"status": "unreadable"}
    if not isinstance(state, dict):
        return {"status": "unreadable"}
    return {k: v for k, v in state.items() if k not in _HIDDEN_KEYS}
