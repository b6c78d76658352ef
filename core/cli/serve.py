"""CLI: `serve`, the HTTP prediction service (SageMaker's /ping and /invocations) for a model."""
from __future__ import annotations

from pathlib import Path

from core.cli.models import add_engine_arguments
from core.errors import UsageError


def _serve(args) -> int:
    from core.jobs.runs import current_model_path
    from core.serving.server import serve

    model = Path(args.model).expanduser() if args.model else current_model_path()
    if model is None:
        raise UsageError("no current model yet: pass --model RUN_DIR/model.pt (or train one)")
    if not model.exists():
        raise UsageError(f"{model}: no such model file")
    serve(model, host=args.host, port=args.port, engine=args.engine, precision=args.precision, max_batch=args.max_batch,
          window_ms=args.batch_window_ms, max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    return 0


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve a model over HTTP (POST /invocations, GET /ping, /docs)")
    serve.add_argument("--model", default=None, help="RUN_DIR/model.pt (default: the current model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8080)
    add_engine_arguments(serve)
    serve.add_argument("--max-batch", type=int, default=16, help="most photos in one forward pass")
    serve.add_argument("--batch-window-ms", type=float, default=5.0,
                       help="how long a photo waits for others to share its forward pass")
    serve.add_argument("--max-body-mb", type=float, default=10.0, help="larger request bodies get 413")
    serve.set_defaults(handler=_serve)
