"""`cxr serve`: the web app and API on uvicorn. Honours $PORT (Heroku and most container platforms set it).

--workers N runs N uvicorn worker processes behind one port, each holding its own copy of the model
(about 150 MB a process for the bundled model on its ONNX artefacts, ~1 GB on torch): N x that must fit
the machine (docs/DEPLOY.md). The workers are started fresh (spawned), so the options reach them as JSON
in $CXR_SERVE_OPTIONS (cxr.settings.serve_options), read by `worker_app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cxr.cli._options import WORKERS_HELP

DEFAULT_PORT = 8000


def resolve_port(port: Optional[int], env: dict | None = None) -> int:
    """--port, else $PORT, else 8000. A malformed $PORT is an error, not a silent fallback to 8000."""
    from cxr import settings

    if port is not None:
        return port
    from_env = settings.port(env)
    return DEFAULT_PORT if from_env is None else from_env


def worker_app():
    """The app of one --workers process (uvicorn's factory): the options `serve` put in the environment."""
    from cxr import settings
    from cxr.web.app import create_app

    o = settings.serve_options()
    return create_app(model=o.get("model"), max_concurrency=int(o.get("concurrency", 1)),
                      max_queue=int(o.get("queue", 8)), threads=o.get("threads"))


def serve(
    model: Optional[Path] = typer.Option(None, "--model",
                                         help="A .safetensors checkpoint (default: $CXR_MODEL, else the bundled one)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 in a container."),
    port: Optional[int] = typer.Option(None, help="Port (default: $PORT, else 8000)."),
    concurrency: int = typer.Option(1, min=1, help="Inferences at once; concurrency x threads ~ cores."),
    queue: int = typer.Option(8, min=0, help="Requests allowed to wait for a slot; beyond that: 503."),
    threads: Optional[int] = typer.Option(None, min=1, help="Compute threads per inference, torch or ONNX Runtime (default: all cores)."),
    workers: int = typer.Option(1, min=1, help=f"{WORKERS_HELP} serving requests, each with its own model "
                                "(~150 MB each on ONNX artefacts); workers x concurrency x threads ~ cores."),
) -> None:
    """Serve the web page and the JSON API (OpenAPI at /openapi.json, reference at /docs). Not for clinical use."""
    import uvicorn

    from cxr import settings
    from cxr.web.app import create_app

    model = model if model is not None else settings.model_from_env()
    port = resolve_port(port)
    # proxy_headers: behind a TLS-terminating proxy the scheme and client come from X-Forwarded-*.
    common = dict(host=host, port=port, log_level="info", proxy_headers=True, server_header=False)
    if workers > 1:
        from cxr.inference.artefacts import resolve_model

        path = resolve_model(model)  # a bad --model is reported here, once, not by every worker
        settings.set_serve_options({"model": str(path), "concurrency": concurrency, "queue": queue,
                                    "threads": threads})
        typer.echo(f"cxr: serving {path.name} in {workers} processes on http://{host}:{port}  "
                   "(not for clinical use)")
        uvicorn.run("cxr.cli.serve:worker_app", factory=True, workers=workers, **common)
        return
    app = create_app(model=model, max_concurrency=concurrency, max_queue=queue, threads=threads)
    engine = "ONNX Runtime, no torch" if getattr(app.state.predictor, "torch_free", False) else "torch"
    typer.echo(f"cxr: serving {app.state.predictor.meta.arch} ({engine}) on http://{host}:{port}  "
               "(not for clinical use)")
    uvicorn.run(app, **common)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
