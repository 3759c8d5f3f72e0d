"""The `http` backend: any OpenAI-compatible `/v1/chat/completions` endpoint (a vLLM or
SGLang server, Ray Serve LLM, a hosted API), through `ray.data.llm`'s
HttpRequestProcessorConfig: one request per pair, the answer from
`choices[0].message.content`, its token count from `usage.completion_tokens`.

Ray's request stage retries 408/429/502/503/504, time-outs and connection errors with
exponential backoff. The session given to it adds: other 5xx are retried as well, and
401/403 and other 4xx fail at once with the status and the server's message (Ray would
otherwise pass a 4xx's error JSON on as if it were an answer, and choke on a non-JSON
error page).

The API key never passes through the config, Ray's task specs or the outputs: the config
names an environment variable (`api_key_env`) and each request actor reads that variable
in its own process. So on a multi-node cluster the variable must be set on every worker
node too, not only where the job starts (on Kubernetes: a Secret as an env var of the
worker pods); on a local cluster it must be set before Ray starts.
"""
from __future__ import annotations

import functools
import json
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp

from cir.generate.llm import ChatTask, LLMBackend

RAY_RETRIES = {408, 429, 502, 503, 504}     # HttpRequestUDF.RETRYABLE_STATUS_CODES
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


@dataclass
class HttpOptions:
    """`generate.http`."""

    url: str = "http://127.0.0.1:8000/v1/chat/completions"   # the full chat-completions URL
    model: str = ""              # the model name sent in each request
    api_key_env: str = ""        # the NAME of an environment variable holding the key; "": no key
    qps: int | None = None       # requests per second per actor; None: no limit
    max_retries: int = 3
    base_retry_wait_time_in_s: float = 1.0
    timeout_s: float = 60.0      # per request
    cpus_per_actor: float = 0.25  # request actors and pre/post-processing wait on the network


class EndpointError(RuntimeError):
    """The endpoint refused a request (bad key, URL or model): retrying will not help."""


class RetryableError(aiohttp.ClientConnectionError):
    """A failure Ray's stage should back off and retry: it retries connection errors."""


def read_key(name: str) -> str:
    """The key in $name ("" when no variable is named). The error names the variable only."""
    if not name:
        return ""
    key = os.environ.get(name, "")
    if not key:
        raise ValueError(f"generate.http.api_key_env names ${name}, which is not set on {socket.gethostname()}; "
                            "set it wherever the job and its Ray workers run (e.g. from a Kubernetes Secret)")
    return key


def status_error(status: int, body: str, url: str, api_key_env: str, key: str) -> Exception | None:
    """The error an HTTP status stands for; None for success and what Ray retries itself."""
    if status < 400 or status in RAY_RETRIES:
        return None
    try:
        error = json.loads(body).get("error") or body
        message = error.get("message", error) if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = body
    message = str(message)[:300]
    if key:
        message = message.replace(key, "***")      # a server may echo what it was sent
    if status in (401, 403) and api_key_env:
        return EndpointError(f"{url} refused the key in ${api_key_env} (HTTP {status}: {message})")
    if status in (401, 403):
        return EndpointError(f"{url} wants an API key (HTTP {status}: {message}): put it in an environment "
                             "variable and name that variable in generate.http.api_key_env")
    cls = RetryableError if status >= 500 else EndpointError
    return cls(f"HTTP {status} from {url}: {message}")


@dataclass(frozen=True)
class KeySession:
    """`session_factory` of Ray's request stage: picklable, it holds the variable's name and
    reads the key in the worker when Ray opens a session (one per batch)."""

    url: str
    api_key_env: str
    timeout_s: float

    def __call__(self) -> aiohttp.ClientSession:
        key = read_key(self.api_key_env)
        url, name = self.url, self.api_key_env

        async def check(request, handler):       # an aiohttp client middleware
            try:
                response = await handler(request)
            except aiohttp.ClientConnectorError as e:
                raise RetryableError(f"{url} is unreachable: is the server down? ({e})") from None
            error = status_error(response.status, await response.text() if response.status >= 400 else "",
                                 url, name, key)
            if error is not None:
                response.release()
                raise error
            return response

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                     middlewares=(check,))


def _request(row: dict, model: str, task: ChatTask, sampling: dict) -> dict:
    return {"payload": {"model": model, "messages": task.messages(row["ref_caption"], row["tgt_caption"]),
                        "max_tokens": task.max_new_tokens, **sampling}}


def _answer(row: dict, output: str, carry: list[str], url: str) -> dict:
    response = row["http_response"]
    error, choices = response.get("error"), response.get("choices")
    if error or choices is None or len(choices) == 0:
        message = error.get("message", error) if isinstance(error, dict) else error
        raise EndpointError(f"{url} answered with no choices: {str(message or response)[:300]}")
    usage = response.get("usage") or {}
    return {**{name: row[name] for name in carry}, output: choices[0]["message"]["content"] or "",
            output + "_tokens": int(usage.get("completion_tokens") or 0)}


class HttpBackend(LLMBackend):
    name = "http"

    @property
    def model_id(self) -> str:
        return self.options.model

    def validate_engine(self) -> None:
        o = self.options
        parts = urlsplit(o.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"generate.http.url must be an http(s) URL, got {o.url!r}")
        if parts.username or parts.password:
            raise ValueError("generate.http.url must not hold credentials: put the key in an environment "
                             "variable and name it in generate.http.api_key_env")
        if not o.model:
            raise ValueError("generate.http.model must name the model to ask (the request's `model`)")
        if o.api_key_env and not _ENV_NAME.fullmatch(o.api_key_env):
            # Not echoed: a value that is no variable name may be the key itself.
            raise ValueError("generate.http.api_key_env must be the NAME of an environment variable "
                             "(A-Z, 0-9, _) that holds the key, not the key")
        read_key(o.api_key_env)
        for name, low in [("max_retries", 0), ("base_retry_wait_time_in_s", 0)]:
            if getattr(o, name) < low:
                raise ValueError(f"generate.http.{name} must be >= {low}, got {getattr(o, name)}")
        for name in ("timeout_s", "cpus_per_actor"):
            if getattr(o, name) <= 0:
                raise ValueError(f"generate.http.{name} must be > 0, got {getattr(o, name)}")
        if o.qps is not None and o.qps < 1:
            raise ValueError(f"generate.http.qps must be >= 1 or null, got {o.qps}")

    def check_cluster(self) -> None:
        """Refuse an endpoint that is down, or that refuses the key, URL or model, before
        any stage runs: a 1-token request from the driver (the workers' network may
        differ, but usually not)."""
        import urllib.error
        import urllib.request

        from cir.progress import log

        o = self.options
        parts = urlsplit(o.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(o.timeout_s, 5)).close()
        except OSError as e:
            raise ConnectionError(f"the http backend's endpoint {o.url} is unreachable ({e}): "
                                  "is the server down, or the URL wrong?") from None
        key = read_key(o.api_key_env)
        body = json.dumps({"model": o.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        # No proxies: aiohttp in the workers ignores them too.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(urllib.request.Request(o.url, body.encode(), headers), timeout=o.timeout_s):
                return
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode(errors="replace")
        except OSError as e:        # reachable but slow or flaky: the retries may cope
            log(f"http backend: test request to {o.url} failed ({type(e).__name__}); going on")
            return
        error = status_error(status, text, o.url, o.api_key_env, key)
        if isinstance(error, EndpointError):
            raise error
        log(f"http backend: test request to {o.url} got HTTP {status}; going on (requests are retried)")

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        # The model name says what writes the texts (the sampling is in the task). The
        # URL says only where it is served: it changes with port-forwards and service
        # names, and may carry a token, so it is left out; the key never goes in.
        fp["options"] = {"model": self.options.model}
        return fp

    def generate(self, ds, task: ChatTask, carry: list[str]):
        from ray.data.llm import HttpRequestProcessorConfig, build_processor

        o, t = self.options, self.task
        config = HttpRequestProcessorConfig(
            url=o.url, qps=o.qps, max_retries=o.max_retries, base_retry_wait_time_in_s=o.base_retry_wait_time_in_s,
            batch_size=self.batch_size, concurrency=self.num_actors,
            session_factory=KeySession(o.url, o.api_key_env, o.timeout_s),
            http_request_stage={"num_cpus": o.cpus_per_actor})
        sampling = {"temperature": t.temperature, "top_p": t.top_p, "seed": t.seed}
        # Light row maps: a whole CPU each would starve the actors on a small node.
        light = {"num_cpus": o.cpus_per_actor}
        processor = build_processor(
            config, preprocess=functools.partial(_request, model=o.model, task=task, sampling=sampling),
            postprocess=functools.partial(_answer, output=task.output, carry=carry, url=o.url),
            preprocess_map_kwargs=light, postprocess_map_kwargs=light)
        return processor(ds)
