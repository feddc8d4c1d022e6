"""The Ray Serve app: an OpenAI-compatible server whose replicas each hold one engine.

Each replica gets a placement group of 1 + tensor_parallel_size bundles: bundle 0, a small CPU
bundle, holds the replica itself (HTTP, tokenizer, scheduler: the engine's driver, in the
replica's process), and one bundle per rank follows (a GPU, or on CPU-only clusters a CPU). The
engine finds the group it runs in and places its ranks on the group's last bundles.

A replica is up as soon as its engine has begun to start (on a thread of its own): until the
engine is ready, a request waits up to START_WAIT_S for it and is then answered 503 with
Retry-After, and /health answers 503 {"status": "starting"}. `run_server` follows the start
(`start_status`): the engine's progress bars, its load report, then the URL it serves at.

    serve run driver.serve:app                                                # the embedded default model
    serve run driver.serve:build_app model=PATH tensor_parallel_size=2 model_id=my-model
    shardlm serve --model PATH -tp 2 --port 8000                              # run_server
"""

import asyncio
import difflib
import hmac
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import fields
from typing import Annotated, Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from cluster.connect import (
    cluster_device,
    connect,
    forwarded_env,
    shutdown_local_cluster,
    started_local_cluster,
    worker_logs_muted,
)
from cluster.logs import ROOT, quiet_ray_loggers, ray_level
from cluster.placement import STRATEGIES, rank_bundle
from driver.config.args import EngineArgs
from driver.config.generation_defaults import load_generation_defaults
from driver.engine.metrics import prometheus_text
from driver.engine.progress import StartProgress
from driver.engine.report import LoadReport
from driver.entrypoints.async_engine import AsyncEngine, StartingEngine
from driver.entrypoints.openai_api import OpenAIError, OpenAIServing, error_response
from parallel.errors import ConfigError, EngineAsleepError, EngineDeadError, ShardLMError
from workers.model_files import DEFAULT_MODEL_NAME

logger = logging.getLogger(f"shardlm.{__name__}")

APP_NAME = "shardlm"
REPLICA_BUNDLE = {"CPU": 1.0}
"""Bundle 0 of each replica's placement group: the replica's own process."""
START_WAIT_S = 5.0
"""How long a request sent while the engine starts waits for it before it is answered 503."""
RETRY_AFTER_S = 5
"""The Retry-After of that 503, in seconds."""
MAX_BODY_BYTES = 16 * 2**20
"""The largest request body a replica reads (a larger one is a 413)."""
DRAIN_BODY_BYTES = 64 * 2**20
"""How much of a body past the limit is read (and dropped) before the connection is let go."""
API_KEY_ENV = "SHARDLM_API_KEY"
"""Where the API key is taken from when none is given: requests to /v1 must then carry it."""
DRAIN_POLL_S = 0.2
"""How often a replica looks whether its app is draining (`drain_app`)."""
SHUTDOWN_TIMEOUT_S = 30.0
"""How long `shardlm serve` lets requests in flight finish after SIGTERM or Ctrl-C."""
QUEUE_PROBE_ENV = "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S"
QUEUE_PROBE_S = "1.0"
"""How long Serve's routers wait for a replica to say how busy it is (Serve's default, 0.1 s, is
short for a replica whose engine is loading on the same cores: each miss logs a WARNING)."""

Positive = Annotated[int, msgspec.Meta(ge=1)]


class ModelLoadingConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    model_id: str | None = None
    """The name clients give as `model`; None: model_source, or the default model's name."""
    model_source: str | None = None
    """A local folder, a Hugging Face repo id or a .gguf file; None: the embedded default model."""
    tokenizer_source: str | None = None
    """A folder or repo id to take the tokenizer from; None: the model's own."""


class DeploymentConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Ray Serve's deployment options, with defaults for an LLM engine."""

    name: str | None = None
    num_replicas: Positive = 1
    max_ongoing_requests: Positive | None = None
    """Requests a replica holds at once; None: the engine's max_num_seqs (one batch), and
    requests beyond it queue at the caller (the HTTP proxy)."""
    max_queued_requests: int = -1
    """Requests each caller (the HTTP proxy) queues before answering 503 with Retry-After; -1: no limit."""
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S + 10.0
    max_constructor_retry_count: int = 2
    """Engine starts to try per replica before the deployment fails (Serve's default, 20, is long for an engine)."""


class PlacementGroupConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    strategy: str = "PACK"
    """How the replica's bundles spread over nodes: PACK, STRICT_PACK, SPREAD or STRICT_SPREAD."""


class LLMConfig(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One served model, in the shape of Ray Serve LLM's `LLMConfig`."""

    model_loading_config: ModelLoadingConfig = msgspec.field(default_factory=ModelLoadingConfig)
    engine_kwargs: dict[str, Any] = {}
    """`EngineArgs` fields (not model or tokenizer: those are model_loading_config's)."""
    deployment_config: DeploymentConfig = msgspec.field(default_factory=DeploymentConfig)
    placement_group_config: PlacementGroupConfig = msgspec.field(default_factory=PlacementGroupConfig)
    api_key: str | None = None
    """Requests to /v1 must carry `Authorization: Bearer <api_key>`; None: SHARDLM_API_KEY in the
    replica's environment, else no key is asked for. /health and /metrics stay open."""
    max_request_body_bytes: Positive = MAX_BODY_BYTES

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        shown = msgspec.structs.replace(self, api_key="***" if self.api_key else None)
        return f"LLMConfig({msgspec.structs.asdict(shown)})"

    def engine_args(self) -> EngineArgs:
        """The engine's arguments, checked (no files read); values may be strings, as `serve run` gives them."""
        kwargs = dict(self.engine_kwargs)
        for name, where in (("model", "model_source"), ("tokenizer", "tokenizer_source")):
            if name in kwargs:
                raise ConfigError(f"engine_kwargs has {name!r}: give it as model_loading_config.{where}")
        _check_names(kwargs, [f.name for f in fields(EngineArgs)], "engine argument")
        loading = self.model_loading_config
        kwargs.update(model=loading.model_source, tokenizer=loading.tokenizer_source)
        try:
            args = msgspec.convert(kwargs, EngineArgs, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"engine argument: {exc}") from None
        args.validate()
        if self.placement_group_config.strategy not in STRATEGIES:
            raise ConfigError(
                f"placement strategy {self.placement_group_config.strategy!r} is not one of {', '.join(STRATEGIES)}"
            )
        return args

    def served_model_id(self) -> str:
        loading = self.model_loading_config
        return loading.model_id or loading.model_source or DEFAULT_MODEL_NAME


class StartStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Where one replica's engine start has got (`OpenAIServer.start_status`)."""

    replica: str
    progress: StartProgress | None = None
    """The engine's phase and its ranks' progress (None before the engine is configured)."""
    report: LoadReport | None = None
    """Once the engine is up: what its start cost."""
    error: Any = None
    """Once the start has failed: what stopped it (the exception)."""


# -- the deployment --------------------------------------------------------------------------------


class _Starting(Exception):
    """A request came while the engine starts, and it was not up within START_WAIT_S."""


def _error(exc: Exception) -> Response:
    if isinstance(exc, _Starting):
        body = OpenAIError(503, str(exc), kind="server_error", code="engine_starting").body()
        return _json(503, body, {"Retry-After": str(RETRY_AFTER_S)})
    if not isinstance(exc, (OpenAIError, EngineDeadError, EngineAsleepError)):
        logger.exception("request failed")
    return _json(*error_response(exc))


def _draining() -> Response:
    message = "the server is shutting down and takes no new requests; retry on another replica"
    body = OpenAIError(503, message, kind="server_error", code="server_draining").body()
    return _json(503, body, {"Retry-After": str(RETRY_AFTER_S)})


def _unauthorized() -> Response:
    message = "Incorrect or missing API key: send it as `Authorization: Bearer <key>`"
    return _json(401, OpenAIError(401, message, code="invalid_api_key").body())


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, or a 413 when it is longer than `limit` bytes. What lies past the
    limit is read and dropped (up to DRAIN_BODY_BYTES more), so that the client, still sending,
    reads the 413 rather than a reset connection; nothing past the limit is kept."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > limit + DRAIN_BODY_BYTES:
            break
    if size > limit:
        raise OpenAIError(413, f"the request body is longer than this server takes ({limit} bytes)")
    return b"".join(chunks)


def _dropped_client_future(record: logging.LogRecord) -> bool:
    """False for asyncio's "Future exception was never retrieved" of Ray Serve's own receive
    task, cancelled when a client drops its stream (the drop has its own INFO line)."""
    from ray.exceptions import TaskCancelledError

    error = record.exc_info[1] if record.exc_info else None
    return not (isinstance(error, TaskCancelledError) and "never retrieved" in record.getMessage())


class _Once:
    """`fn`, run at the first call only."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def drain_key(app_name: str) -> bytes:
    """Ray's internal key that tells an app's replicas to drain."""
    return f"shardlm:drain:{app_name}".encode()


def in_flight_key(app_name: str, replica: str) -> bytes:
    """Ray's internal key where a draining replica says how many requests it still holds."""
    return f"shardlm:in_flight:{app_name}:{replica}".encode()


def dev_mode() -> bool:
    """Whether the dev-mode routes (/sleep, /wake_up, /is_sleeping) are on: SHARDLM_SERVER_DEV_MODE=1."""
    return os.environ.get("SHARDLM_SERVER_DEV_MODE", "0") == "1"


def _not_enabled(route: str) -> dict[str, Any]:
    message = f"{route} is a development route: start the server with SHARDLM_SERVER_DEV_MODE=1 to enable it"
    return OpenAIError(404, message, kind="not_found_error").body()


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)


# No `from __future__ import annotations` in this module: FastAPI reads the routes' annotations
# (`request: Request`) as objects, and Serve's class-based view does not resolve strings. And
# what the routes call is defined above them: `serve.ingress` pickles the app when the class is
# defined, with the module's globals as they are then.
api = FastAPI(title="shardlm", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment
@serve.ingress(api)
class OpenAIServer:
    """One replica: the engine's driver in this process, its ranks in this replica's placement group."""

    def __init__(self, config: LLMConfig) -> None:
        args = config.engine_args()
        self.model_id = config.served_model_id()
        self.engine: AsyncEngine | None = None
        self.openai: OpenAIServing | None = None
        self.api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self.max_body = config.max_request_body_bytes
        self.in_flight = 0
        self.draining = threading.Event()
        self.starting = StartingEngine(args, config.placement_group_config.strategy)
        self.generation_config = args.generation_config
        threading.Thread(target=self._watch_drain, name="shardlm-drain-watch", daemon=True).start()
        logging.getLogger("asyncio").addFilter(_dropped_client_future)

    def _watch_drain(self) -> None:
        """Wait for `drain_app` to mark this replica's app as draining; from then on, new
        requests get 503 and the replica says how many it still holds."""
        from ray.experimental import internal_kv

        try:
            context = serve.get_replica_context()
            app, replica = context.app_name, context.replica_id.unique_id
        except Exception:  # not in a replica (made directly, in a test): nothing drains it
            return
        while not self.draining.is_set():
            try:
                if internal_kv._internal_kv_get(drain_key(app)) is not None:
                    self.draining.set()
            except Exception:  # the cluster is going away
                return
            time.sleep(DRAIN_POLL_S)
        logger.info("draining: %d request(s) in flight, no new ones taken", self.in_flight)
        while True:
            try:
                internal_kv._internal_kv_put(in_flight_key(app, replica), str(self.in_flight).encode())
            except Exception:
                return
            time.sleep(DRAIN_POLL_S)

    def _refused(self, request: Request) -> Response | None:
        """What to answer instead of serving `request`: 503 while draining, 401 without the key."""
        if self.draining.is_set():
            return _draining()
        if self.api_key is not None:
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _unauthorized()
        return None

    async def _serving(self) -> OpenAIServing:
        """The OpenAI front, once the engine is up (waiting up to START_WAIT_S for it)."""
        if self.openai is None:
            engine = await self.starting.wait(START_WAIT_S)
            if engine is None:
                phase = self.starting.phase or "configuring"
                raise _Starting(f"the engine is starting ({phase}); retry in {RETRY_AFTER_S} s")
            model = engine.config.model
            self.engine = engine
            if getattr(engine.engine, "metrics", None) is not None:
                engine.engine.metrics.labels["model_name"] = self.model_id
            defaults = load_generation_defaults(self.generation_config, model)
            self.openai = OpenAIServing(engine, self.model_id, model.max_model_len, model.arch.vocab_size, defaults=defaults)
        return self.openai

    async def _answer(self, route: str, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        self.in_flight += 1
        try:
            body = await read_body(request, self.max_body)
            serving = await self._serving()
            result = await getattr(serving, route)(body)
        except BaseException as exc:
            self.in_flight -= 1
            if isinstance(exc, asyncio.CancelledError):  # the client left before its answer began
                logger.info("a client left before its answer began; its request is aborted")
                raise
            if not isinstance(exc, Exception):
                raise
            return _error(exc)
        if isinstance(result, dict):
            self.in_flight -= 1
            return _json(200, result)
        return self._streamed(result)

    def _streamed(self, chunks: AsyncIterator[bytes]) -> StreamingResponse:
        """The stream's response; its request stays counted in flight until the stream ends, or,
        for a stream that never starts (its client left first), until it is collected."""
        release = _Once(self._release)
        counted = self._counted(chunks, release)
        weakref.finalize(counted, release)
        return StreamingResponse(counted, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _release(self) -> None:
        self.in_flight -= 1

    async def _counted(self, chunks: AsyncIterator[bytes], release: Callable[[], None]) -> AsyncIterator[bytes]:
        """A streamed answer, counted in flight until it ends; a client that drops it aborts its
        request (the stream closes), with one INFO line and no traceback."""
        try:
            async for chunk in chunks:
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            logger.info("a client dropped its stream; its request is aborted")
            raise
        finally:
            release()
            await chunks.aclose()

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._answer("completions", request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._answer("chat", request)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            return _json(200, (await self._serving()).models())
        except Exception as exc:
            return _error(exc)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """This replica's engine metrics in Prometheus' text format (every replica's also reach
        Ray's Prometheus endpoint, through `ray.util.metrics`)."""
        engine = self.starting.engine
        figures = [] if engine is None else await engine.call(engine.engine.get_metrics)
        return Response(content=prometheus_text(figures), media_type="text/plain; version=0.0.4")

    @api.get("/health")
    async def health(self) -> Response:
        """200 once the engine is up; 503 {"status": "starting", "phase": ...} while it starts;
        503 with the error once it has failed or died."""
        if not self.starting.done:
            body = {"status": "starting", "phase": self.starting.phase or "configuring"}
            return _json(503, body, {"Retry-After": str(RETRY_AFTER_S)})
        try:
            self.check_health()
        except EngineDeadError as exc:
            return _json(*error_response(exc))
        return Response(status_code=200)

    @api.post("/sleep")
    async def sleep(self, request: Request) -> Response:
        """vLLM's dev-mode route: put the engine to sleep (`?level=1` or 2); off unless
        SHARDLM_SERVER_DEV_MODE=1."""
        if not dev_mode():
            return _json(404, _not_enabled("/sleep"))
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            level = int(request.query_params.get("level", "1"))
            engine = (await self._serving()).engine
            await engine.call(engine.engine.sleep, level)
        except ValueError as exc:
            return _json(400, OpenAIError(400, str(exc), param="level").body())
        except Exception as exc:
            return _error(exc)
        return Response(status_code=200)

    @api.post("/wake_up")
    async def wake_up(self, request: Request) -> Response:
        if not dev_mode():
            return _json(404, _not_enabled("/wake_up"))
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            engine = (await self._serving()).engine
            await engine.call(engine.engine.wake_up)
        except Exception as exc:
            return _error(exc)
        return Response(status_code=200)

    @api.get("/is_sleeping")
    async def is_sleeping(self) -> Response:
        if not dev_mode():
            return _json(404, _not_enabled("/is_sleeping"))
        try:
            engine = (await self._serving()).engine
        except Exception as exc:
            return _error(exc)
        return _json(200, {"is_sleeping": engine.engine.sleep_level > 0})

    async def drain_state(self) -> tuple[bool, int]:
        """(draining, requests in flight), through a DeploymentHandle."""
        return self.draining.is_set(), self.in_flight

    async def stats(self) -> dict[str, int]:
        """The engine's counters (through a DeploymentHandle): running and waiting sequences, free blocks."""
        return await (await self._serving()).engine.stats()

    async def start_status(self) -> StartStatus:
        """Where this replica's engine start has got (through a DeploymentHandle: `run_server`
        follows it)."""
        starting = self.starting
        progress = await asyncio.to_thread(starting.progress) if starting.error is None else None
        report = starting.engine.load_report if starting.engine is not None else None
        return StartStatus(
            replica=serve.get_replica_context().replica_id.unique_id, progress=progress, report=report, error=starting.error
        )

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine failed to start, or died, is replaced
        (one still starting is healthy)."""
        if self.starting.error is not None:
            raise EngineDeadError(f"the engine failed to start: {type(self.starting.error).__name__}: {self.starting.error}")
        if self.starting.engine is not None:
            self.starting.engine.check_health()

    def __del__(self) -> None:
        if getattr(self, "starting", None) is not None:
            self.starting.shutdown()


# -- building and running the app ------------------------------------------------------------------

FLAT_ARGS = {
    "model": ("model_loading_config", "model_source"),
    "tokenizer": ("model_loading_config", "tokenizer_source"),
    "model_id": ("model_loading_config", "model_id"),
    "num_replicas": ("deployment_config", "num_replicas"),
    "max_ongoing_requests": ("deployment_config", "max_ongoing_requests"),
    "max_queued_requests": ("deployment_config", "max_queued_requests"),
    "placement_strategy": ("placement_group_config", "strategy"),
}
"""`serve run driver.serve:build_app KEY=VALUE ...`: these keys, and every EngineArgs field."""


def parse_config(args: dict[str, Any]) -> LLMConfig:
    """An `LLMConfig` from `build_app`'s arguments: either its own shape (model_loading_config,
    engine_kwargs, ...), or flat keys (model=..., tensor_parallel_size=2, num_replicas=1, ...)."""
    nested: dict[str, Any] = dict(args)
    if not any(key in LLMConfig.__struct_fields__ for key in args):
        _check_names(args, [*FLAT_ARGS, *(f.name for f in fields(EngineArgs))], "argument")
        nested = {"engine_kwargs": {}}
        for key, value in args.items():
            section, name = FLAT_ARGS.get(key, ("engine_kwargs", key))
            nested.setdefault(section, {})[name] = value
    try:
        return msgspec.convert(nested, LLMConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid server configuration: {exc}") from None


def build_app(args: dict) -> serve.Application:
    """The app for `serve run driver.serve:build_app KEY=VALUE ...`: the arguments are checked and
    the model found (and its layout checked) here, before anything is deployed."""
    config = parse_config(args)
    engine_args = config.engine_args()
    config = pinned(config, check_model(engine_args))
    return bind(config, config.engine_args())


def check_model(args: EngineArgs) -> str | None:
    """Find the model and check that its layout splits over the ranks (a missing model, or heads
    that do not divide, fail here rather than in every replica); a Hub model's commit."""
    return args.find_checked_model()[0].commit


def pinned(config: LLMConfig, commit: str | None) -> LLMConfig:
    """`config` with a Hub model's revision replaced by the commit it resolved to here, so that
    every replica, on any node, loads that commit and none re-resolves a branch."""
    if commit is None:
        return config
    return msgspec.structs.replace(config, engine_kwargs={**config.engine_kwargs, "revision": commit})


def bind(config: LLMConfig, args: EngineArgs) -> serve.Application:
    """The deployment with its placement group (replica bundle, then a bundle per rank), bound to
    its config; nothing starts until Serve deploys it."""
    use_gpu = cluster_device(args.device, probe_capability=False)[0] == "cuda"
    config = msgspec.structs.replace(config, engine_kwargs={**config.engine_kwargs, "device": "cuda" if use_gpu else "cpu"})
    bundles = [dict(REPLICA_BUNDLE)] + [rank_bundle(use_gpu) for _ in range(args.tensor_parallel_size)]
    deployment = config.deployment_config
    options = {f: getattr(deployment, f) for f in deployment.__struct_fields__ if f != "name"}
    if deployment.name is not None:
        options["name"] = deployment.name
    if deployment.max_ongoing_requests is None:  # one batch's worth: the rest queue at the proxy
        options["max_ongoing_requests"] = args.max_num_seqs
    options["backpressure_config"] = {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
    return OpenAIServer.options(
        **options,
        logging_config=serve_logging(),
        ray_actor_options={"num_cpus": REPLICA_BUNDLE["CPU"], "runtime_env": {"env_vars": forwarded_env()}},
        placement_group_bundles=bundles,
        placement_group_strategy=config.placement_group_config.strategy,
    ).bind(config)


def serve_logging() -> dict[str, Any]:
    """Ray Serve's logging in its controller, proxies and replicas: WARNING and above, with no
    line per request, unless shardlm logs at DEBUG (then INFO, and the access log)."""
    level = ray_level()
    return {"log_level": logging.getLevelName(level), "enable_access_log": level <= logging.INFO, "encoding": "TEXT"}


def _check_names(given: dict[str, Any], valid: list[str], what: str) -> None:
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid ones: {', '.join(valid)}"
            raise ConfigError(f"unknown {what} {key!r}{hint}")


def run_server(
    engine_args: EngineArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    num_replicas: int = 1,
    max_ongoing_requests: int | None = None,
    blocking: bool = True,
    model_id: str | None = None,
    show_progress: bool | None = None,
    max_queued_requests: int = -1,
    api_key: str | None = None,
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
) -> "serve.handle.DeploymentHandle | None":
    """Serve the model at http://host:port/v1 (OpenAI's API) until Ctrl-C or SIGTERM, then shut
    Serve down (and the local cluster, if this call started it).

    The model is found and checked before Ray starts (a local cluster, unless RAY_ADDRESS or an
    earlier ray.init gives one). Once every replica's engine is up it prints the load report and
    the URL; with `blocking=False` it returns the app's handle instead, and `serve.shutdown()`
    stops it. `model_id`: the name clients give (default: the model as given, or the default
    model's name). `show_progress`: the engine's start-up bars and load report (default: unless
    shardlm logs above INFO, as under -q). `max_ongoing_requests`: per replica (default: the
    engine's max_num_seqs); beyond it requests queue, up to `max_queued_requests` (-1: no
    limit; a full queue is 503 with Retry-After). `api_key`: what /v1 requests must carry
    (default: SHARDLM_API_KEY, else none). On SIGTERM or Ctrl-C the app drains: new requests get
    503, those in flight may finish for up to `shutdown_timeout_s`, then it ends.
    """
    kwargs = engine_args.non_default_kwargs()
    loading = ModelLoadingConfig(
        model_id=model_id, model_source=kwargs.pop("model", None), tokenizer_source=kwargs.pop("tokenizer", None)
    )
    config = LLMConfig(
        model_loading_config=loading,
        engine_kwargs=kwargs,
        deployment_config=DeploymentConfig(
            num_replicas=num_replicas,
            max_ongoing_requests=max_ongoing_requests,
            max_queued_requests=max_queued_requests,
            graceful_shutdown_timeout_s=shutdown_timeout_s + 10.0,
        ),
        api_key=api_key or os.environ.get(API_KEY_ENV) or None,
    )
    if show_progress is None:
        show_progress = logging.getLogger(ROOT).getEffectiveLevel() <= logging.INFO
    config = pinned(config, check_model(config.engine_args()))
    args = config.engine_args()
    os.environ.setdefault(QUEUE_PROBE_ENV, QUEUE_PROBE_S)  # for the proxies of a local cluster started here
    connect(None, num_cpus=(args.tensor_parallel_size + 1) * num_replicas)
    app = bind(config, args)
    logger.info("starting Ray Serve at http://%s:%d and %d engine(s) behind it", host, port, num_replicas)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config=serve_logging())
        quiet_ray_loggers()  # Serve's own logger in this process, set to INFO when Ray Serve was imported
        handle = serve.run(app, name=APP_NAME, route_prefix="/", logging_config=serve_logging())
        report = wait_until_started(handle, num_replicas, show_progress)
    except BaseException:  # an engine that cannot start, or Ctrl-C meanwhile
        stop_serving()
        raise
    if not blocking:
        return handle
    if show_progress:
        print(report.format() + "\n", flush=True)
    print(f"shardlm: serving {config.served_model_id()!r} at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
    try:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (cluster.connect.Terminated)
            drain_app(handle, shutdown_timeout_s)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now
        pass
    finally:
        stop_serving()
    return None


def drain_app(handle: "serve.handle.DeploymentHandle", timeout_s: float, app_name: str = APP_NAME) -> bool:
    """Tell the app's replicas to take no new request (503) and wait up to `timeout_s` for
    those in flight to finish; whether they all did. Each replica answers under its own key
    (`in_flight_key`); the wait ends once as many replicas as Serve runs have said 0."""
    from ray.experimental import internal_kv

    print(f"shardlm: draining: waiting up to {timeout_s:g} s for requests in flight", flush=True)
    replicas = _running_replicas(app_name)
    prefix = in_flight_key(app_name, "")
    internal_kv._internal_kv_put(drain_key(app_name), b"1")
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            counts = [internal_kv._internal_kv_get(key) for key in internal_kv._internal_kv_list(prefix)]
            if len(counts) >= replicas and all(c is not None and int(c) == 0 for c in counts):
                return True
            time.sleep(DRAIN_POLL_S)
        logger.warning("requests still in flight after %g s: ending them", timeout_s)
        return False
    finally:
        internal_kv._internal_kv_del(drain_key(app_name))
        for key in internal_kv._internal_kv_list(prefix):
            internal_kv._internal_kv_del(key)


def _running_replicas(app_name: str) -> int:
    """How many replicas Serve runs for the app (0 if it has none)."""
    status = serve.status().applications.get(app_name)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def wait_until_started(handle: "serve.handle.DeploymentHandle", num_replicas: int, show_progress: bool) -> LoadReport:
    """Follow the replicas' engine starts until `num_replicas` of them are up: the progress bars
    of the first replica to answer, and its load report; the error of the first start that fails."""
    from driver.engine.progress import POLL_S, StartBars, bars_enabled

    bars = StartBars() if bars_enabled(show_progress) else None
    followed, ready, report = None, set(), None
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addFilter(_slow_probe)  # this process's router read its deadline at import
    try:
        while len(ready) < num_replicas:
            status = handle.start_status.remote().result(timeout_s=60)
            if status.error is not None:
                raise _start_failed(status.error)
            followed = followed or status.replica
            if status.replica == followed and status.progress is not None and bars is not None:
                bars.update(status.progress)
            if status.report is None:
                time.sleep(POLL_S)
                continue
            ready.add(status.replica)
            if status.replica == followed:
                report = status.report
    finally:
        serve_logger.removeFilter(_slow_probe)
        if bars is not None:
            bars.close()
    return report if report is not None else status.report


def _slow_probe(record: logging.LogRecord) -> bool:
    """False for the WARNING of a router whose replica was slow to say how busy it is."""
    return not record.getMessage().startswith("Failed to get queue length")


def _start_failed(error: BaseException) -> BaseException:
    """What to raise for an engine start that failed in a replica: the error itself when shardlm
    raised it on purpose (a missing model, memory that does not fit), else EngineDeadError."""
    if isinstance(error, ShardLMError):
        return error
    return EngineDeadError(f"the engine failed to start: {type(error).__name__}: {error}")


def stop_serving() -> None:
    """Shut Serve down, printing nothing of it: with the local cluster, if this process started
    one (Serve's actors end with it), else through Serve's own shutdown."""
    if started_local_cluster():
        shutdown_local_cluster()
        return
    with worker_logs_muted():  # only this app: others on the cluster keep serving
        serve.delete(APP_NAME)


app = bind(LLMConfig(), EngineArgs())
"""`serve run driver.serve:app`: the embedded default model, built without reading any file."""
