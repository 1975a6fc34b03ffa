"""The web server: one process serving the page (Gradio) and the HTTP API (FastAPI).

    app = create_app(Service(m2sa_jax.load("converted/m2sa_7b"), ServeSettings(max_batch=8)))
    uvicorn.run(app, host="127.0.0.1", port=7860)     # what ``python -m m2sa_jax.serve`` does

Uploads stay in memory (API) or in a private temporary folder (the page's uploads and downloads,
mode 0700, removed on shutdown); no request field names a file on the server.
"""

from __future__ import annotations

import contextlib

from fastapi import FastAPI

from m2sa_jax.inference.api import (BodyLimit, api_router, error_response,
                                    install_error_handlers)
from m2sa_jax.inference.page import mount_page
from m2sa_jax.inference.service import NotReady, Service

def create_app(service: Service, *, start: bool = True):
    """FastAPI app with the API under ``/api``, OpenAPI docs at ``/docs`` and the page at ``/``.
    The service's warm-up starts with the app (its lifespan) and it stops with it."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start:
            service.start()
        yield
        service.stop()

    app = FastAPI(title="M²SA segmentation server", lifespan=lifespan,
                  description="Ask a LISA/M²SA model about an image: the answer and one mask "
                              "per [SEG]. All model endpoints take multipart/form-data.")
    install_error_handlers(app)

    @app.exception_handler(NotReady)
    async def _not_ready(request, exc: NotReady):
        return error_response(503, str(exc), {"Retry-After": "5"})

    app.include_router(api_router(service))
    app.add_middleware(BodyLimit, limit=service.settings.max_body_bytes)
    app.state.service = service
    return mount_page(app, service)
