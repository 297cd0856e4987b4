"""A bare FastAPI no-op (`PUT /predictions/{model}` -> `[]`) under uvicorn with uvloop and httptools,
as detserve's front runs: the framework floor that detserve's `null` model adds the worker hop to.

Run: python -m service.bench.noop_app PORT
"""
from __future__ import annotations

import sys

from fastapi import FastAPI, Request, Response

app = FastAPI()


@app.api_route("/predictions/{model}", methods=["PUT", "POST"])
async def predictions(model: str, request: Request) -> Response:
    await request.body()
    return Response(b"[]", media_type="application/json")


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_config=None, access_log=False,
                server_header=False, loop="uvloop", http="httptools", lifespan="off")
