"""A tokenloom server on a free loopback port, run by uvicorn in a thread (one per test module)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from tokenloom.serving import ServerConfig, create_app


@dataclass
class RunningServer:
    url: str
    app: object
    server: uvicorn.Server
    thread: threading.Thread
    llm: object

    @property
    def engine(self):
        return self.llm.async_engine

    def idle(self, timeout: float = 30.0) -> bool:
        """Wait until the engine has no running or waiting request and every KV block is free."""

        def check(engine) -> bool:
            bm = engine.block_manager
            return not engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine.call(check):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(llm, config: ServerConfig | None = None) -> RunningServer:
    app = create_app(config or ServerConfig(served_model_name="smollm2"), llm=llm)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the test server did not start")
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread, llm)
