"""moto's S3 server on 127.0.0.1 in a process of its own, so that it shares no GIL with the benchmark measuring it."""
from __future__ import annotations

import contextlib
import multiprocessing


def _serve(conn) -> None:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send(f"http://{host}:{port}")
    try:
        conn.recv()  # serve until the parent says stop, or goes away
    except EOFError:
        pass
    server.stop()


@contextlib.contextmanager
def moto_server():
    """The endpoint URL of a moto S3 server running in a child process; the server stops on leaving the block."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the benchmark's state
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(theirs,), daemon=True)
    process.start()
    try:
        yield ours.recv()
    finally:
        with contextlib.suppress(OSError):
            ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()
