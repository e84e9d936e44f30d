"""`cxr serve`: the web app and API on uvicorn. Honours $PORT (Heroku and most container platforms set it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

DEFAULT_PORT = 8000


def resolve_port(port: Optional[int], env: dict | None = None) -> int:
    """--port, else $PORT, else 8000. A malformed $PORT is an error, not a silent fallback to 8000."""
    from cxr import settings

    if port is not None:
        return port
    from_env = settings.port(env)
    return DEFAULT_PORT if from_env is None else from_env


def serve(
    model: Optional[Path] = typer.Option(None, "--model",
                                         help="A .safetensors checkpoint (default: $CXR_MODEL, else the bundled one)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 in a container."),
    port: Optional[int] = typer.Option(None, help="Port (default: $PORT, else 8000)."),
    concurrency: int = typer.Option(1, min=1, help="Inferences at once; concurrency x threads ~ cores."),
    queue: int = typer.Option(8, min=0, help="Requests allowed to wait for a slot; beyond that: 503."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads per inference, torch or ONNX Runtime (default: all cores)."),
) -> None:
    """Serve the web page and the JSON API (OpenAPI at /openapi.json, reference at /docs). Not for clinical use."""
    import uvicorn

    from cxr import settings
    from cxr.web.app import create_app

    model = model if model is not None else settings.model_from_env()
    port = resolve_port(port)
    app = create_app(model=model, max_concurrency=concurrency, max_queue=queue, threads=threads)
    typer.echo(f"cxr: serving {app.state.predictor.meta.arch} on http://{host}:{port}  (not for clinical use)")
    # proxy_headers: behind a TLS-terminating proxy the scheme and client come from X-Forwarded-*.
    uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=True, server_header=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
