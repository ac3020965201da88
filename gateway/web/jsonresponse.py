"""JSON responses serialized with orjson (FastAPI's own ORJSONResponse is
deprecated; this is the same thing on Starlette's JSONResponse)."""
from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class OrjsonResponse(JSONResponse):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)
