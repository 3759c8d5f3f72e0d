"""An OpenAI-compatible chat server for tests of the `http` backend.

`POST /v1/chat/completions` answered by a `ChatModel` (tests/tiny_llm.py's model), served
by uvicorn in a background thread on a free port of 127.0.0.1. A test can make it fail
the next requests with given statuses (`fail_next`) or all of them (`always`), require a
bearer key, or go down after a number of requests (`down_after`); it counts requests and
records the Authorization headers it saw.
"""
from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import JSONResponse, PlainTextResponse


class ChatServer:
    def __init__(self, model, key: str | None = None):
        self.model, self.lock = model, threading.Lock()
        self.reset(key)
        app = FastAPI()
        app.post("/v1/chat/completions")(self.complete)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1/chat/completions"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def reset(self, key: str | None = None) -> None:
        self.key, self.failures, self.always, self.down_after = key, [], None, None
        self.requests, self.answered, self.auth = 0, 0, []

    def fail_next(self, *statuses: int) -> None:
        self.failures.extend(statuses)

    def start(self) -> ChatServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test chat server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def go_down(self) -> None:
        """Stop listening (later connects are refused) before this answer goes out: uvicorn
        closes its listening sockets first, then waits for the requests in flight."""
        self.server.should_exit = True
        deadline = time.monotonic() + 5
        while any(s.is_serving() for s in getattr(self.server, "servers", [])) and time.monotonic() < deadline:
            time.sleep(0.02)

    def complete(self, body: dict, authorization: str | None = Header(default=None)):
        with self.lock:
            self.requests += 1
            self.auth.append(authorization)
            if self.down_after is not None and self.requests > self.down_after:
                self.go_down()
                return PlainTextResponse("going down", status_code=503)
            status = self.failures.pop(0) if self.failures else self.always
            if status == 429:
                return JSONResponse({"error": {"message": "rate limited", "type": "rate_limit"}}, status_code=429)
            if status is not None:     # an HTML-ish body, as proxies send: not JSON
                return PlainTextResponse("Internal Server Error", status_code=status)
            if self.key is not None and authorization != f"Bearer {self.key}":
                return JSONResponse({"error": {"message": f"Incorrect API key provided: {authorization}",
                                               "type": "invalid_request_error"}}, status_code=401)
            texts, counts = self.model.chat([body["messages"]], body.get("max_tokens", 16),
                                            temperature=body.get("temperature", 0.0),
                                            top_p=body.get("top_p", 1.0), seed=body.get("seed", 0))
            self.answered += 1
        return {"id": f"chatcmpl-{self.requests}", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0]},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": counts[0], "total_tokens": counts[0]}}
