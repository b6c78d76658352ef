"""Running the service under uvicorn: in the foreground (`python -m core serve`) or on a background thread."""
from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from core.serving.app import create_app


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(model_path, host: str = "127.0.0.1", port: int = 8080, **options) -> None:
    """Serve until interrupted (the request log replaces uvicorn's access log)."""
    configure_logging()
    uvicorn.run(create_app(model_path, **options), host=host, port=port, access_log=False, log_config=None)


class BackgroundServer:
    """The service on 127.0.0.1 on a free port, on a thread: `with BackgroundServer(model) as server: server.url`."""

    def __init__(self, model_path, start_timeout_s: float = 120.0, **options):
        self.app = create_app(model_path, **options)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, access_log=False, log_config=None, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="binsight-serve", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the prediction service did not start (see the log above)")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(30)
        self.socket.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def service(self):
        return self.app.state.service
