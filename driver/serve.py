"""The Ray Serve app: an OpenAI-compatible server whose replicas each hold one engine.

Each replica gets a placement group of 1 + tensor_parallel_size bundles: bundle 0, a small CPU
bundle, holds the replica itself (HTTP, tokenizer, scheduler: the engine's driver, in the
replica's process), and one bundle per rank follows (a GPU, or on CPU-only clusters a CPU). The
engine finds the group it runs in and places its ranks on the group's last bundles.

    serve run driver.serve:app                                                # the embedded default model
    serve run driver.serve:build_app model=PATH tensor_parallel_size=2 model_id=my-model
    shardlm serve --model PATH -tp 2 --port 8000                              # run_server
"""

import difflib
import logging
import os
import time
from dataclasses import fields
from typing import Annotated, Any, Awaitable, Callable

import msgspec
import ray
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray import serve

from cluster.connect import cluster_has_gpus, connect, forwarded_env
from cluster.placement import STRATEGIES, rank_bundle
from driver.args import EngineArgs
from driver.async_engine import AsyncEngine
from driver.openai_api import OpenAIError, OpenAIServing, error_response
from parallel.errors import ConfigError, EngineAsleepError, EngineDeadError
from workers.model_files import DEFAULT_MODEL_NAME
from workers.models import model_class

logger = logging.getLogger(f"shardlm.{__name__}")

APP_NAME = "shardlm"
REPLICA_BUNDLE = {"CPU": 1.0}
"""Bundle 0 of each replica's placement group: the replica's own process."""
DEFAULT_MAX_ONGOING_REQUESTS = 128
"""Requests a replica holds at once; its engine batches them (up to max_num_seqs per step)."""

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
    max_ongoing_requests: Positive = DEFAULT_MAX_ONGOING_REQUESTS
    max_queued_requests: int = -1
    """Requests each caller (the HTTP proxy) queues before answering 503; -1: no limit."""
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
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
            raise ConfigError(f"placement strategy {self.placement_group_config.strategy!r} is not one of {', '.join(STRATEGIES)}")
        return args

    def served_model_id(self) -> str:
        loading = self.model_loading_config
        return loading.model_id or loading.model_source or DEFAULT_MODEL_NAME


# -- the deployment --------------------------------------------------------------------------------


async def _answer(endpoint: Callable[[bytes], Awaitable[Any]], request: Request) -> Response:
    try:
        result = await endpoint(await request.body())
    except Exception as exc:
        if not isinstance(exc, (OpenAIError, EngineDeadError, EngineAsleepError)):
            logger.exception("request failed")
        return _json(*error_response(exc))
    if isinstance(result, dict):
        return _json(200, result)
    return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def dev_mode() -> bool:
    """Whether the dev-mode routes (/sleep, /wake_up, /is_sleeping) are on: SHARDLM_SERVER_DEV_MODE=1."""
    return os.environ.get("SHARDLM_SERVER_DEV_MODE", "0") == "1"


def _not_enabled(route: str) -> dict[str, Any]:
    message = f"{route} is a development route: start the server with SHARDLM_SERVER_DEV_MODE=1 to enable it"
    return OpenAIError(404, message, kind="not_found_error").body()


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(content=msgspec.json.encode(body), status_code=status, media_type="application/json")


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
        self.engine = AsyncEngine.start(config.engine_args(), config.placement_group_config.strategy)
        model = self.engine.config.model
        self.openai = OpenAIServing(self.engine, config.served_model_id(), model.max_model_len, model.arch.vocab_size)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await _answer(self.openai.completions, request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await _answer(self.openai.chat, request)

    @api.get("/v1/models")
    async def models(self) -> Response:
        return _json(200, self.openai.models())

    @api.get("/health")
    async def health(self) -> Response:
        try:
            self.engine.check_health()
        except EngineDeadError as exc:
            return _json(*error_response(exc))
        return Response(status_code=200)

    @api.post("/sleep")
    async def sleep(self, request: Request) -> Response:
        """vLLM's dev-mode route: put the engine to sleep (`?level=1` or 2); off unless
        SHARDLM_SERVER_DEV_MODE=1."""
        if not dev_mode():
            return _json(404, _not_enabled("/sleep"))
        try:
            level = int(request.query_params.get("level", "1"))
            await self.engine.call(self.engine.engine.sleep, level)
        except ValueError as exc:
            return _json(400, OpenAIError(400, str(exc), param="level").body())
        return Response(status_code=200)

    @api.post("/wake_up")
    async def wake_up(self) -> Response:
        if not dev_mode():
            return _json(404, _not_enabled("/wake_up"))
        await self.engine.call(self.engine.engine.wake_up)
        return Response(status_code=200)

    @api.get("/is_sleeping")
    async def is_sleeping(self) -> Response:
        if not dev_mode():
            return _json(404, _not_enabled("/is_sleeping"))
        return _json(200, {"is_sleeping": self.engine.engine.sleep_level > 0})

    async def stats(self) -> dict[str, int]:
        """The engine's counters (through a DeploymentHandle): running and waiting sequences, free blocks."""
        return await self.engine.stats()

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine died is replaced."""
        self.engine.check_health()

    def __del__(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()


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
    check_model(engine_args)
    return bind(config, engine_args)


def check_model(args: EngineArgs) -> None:
    """Find the model and check that its layout splits over the ranks (a missing model, or heads
    that do not divide, fail here rather than in every replica)."""
    _, _, arch = args.find_model()
    model_class(arch.architecture).check_layout(arch, args.tensor_parallel_size)


def bind(config: LLMConfig, args: EngineArgs) -> serve.Application:
    """The deployment with its placement group (replica bundle, then a bundle per rank), bound to
    its config; nothing starts until Serve deploys it."""
    use_gpu = _uses_gpu(args.device)
    config = msgspec.structs.replace(config, engine_kwargs={**config.engine_kwargs, "device": "cuda" if use_gpu else "cpu"})
    bundles = [dict(REPLICA_BUNDLE)] + [rank_bundle(use_gpu) for _ in range(args.tensor_parallel_size)]
    deployment = config.deployment_config
    options = {f: getattr(deployment, f) for f in deployment.__struct_fields__ if f != "name"}
    if deployment.name is not None:
        options["name"] = deployment.name
    return OpenAIServer.options(
        **options,
        ray_actor_options={"num_cpus": REPLICA_BUNDLE["CPU"], "runtime_env": {"env_vars": forwarded_env()}},
        placement_group_bundles=bundles,
        placement_group_strategy=config.placement_group_config.strategy,
    ).bind(config)


def _uses_gpu(device: str) -> bool:
    """Whether the ranks take GPUs: device="auto" asks the cluster when this process has joined
    one, else this machine (`serve run` builds the app before it joins the cluster)."""
    if device != "auto":
        return device == "cuda"
    if ray.is_initialized():
        return cluster_has_gpus()
    import torch

    return torch.cuda.is_available()


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
    max_ongoing_requests: int = DEFAULT_MAX_ONGOING_REQUESTS,
    blocking: bool = True,
    model_id: str | None = None,
) -> "serve.handle.DeploymentHandle | None":
    """Serve the model at http://host:port/v1 (OpenAI's API) until Ctrl-C, then shut Serve down.

    The model is found and checked before Ray starts (a local cluster, unless RAY_ADDRESS or an
    earlier ray.init gives one). With `blocking=False` it returns the app's handle once every
    replica is ready; `serve.shutdown()` stops it. `model_id`: the name clients give (default: the
    model as given, or the default model's name).
    """
    kwargs = {f.name: getattr(engine_args, f.name) for f in fields(EngineArgs) if getattr(engine_args, f.name) != f.default}
    loading = ModelLoadingConfig(model_id=model_id, model_source=kwargs.pop("model", None), tokenizer_source=kwargs.pop("tokenizer", None))
    config = LLMConfig(
        model_loading_config=loading,
        engine_kwargs=kwargs,
        deployment_config=DeploymentConfig(num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests),
    )
    args = config.engine_args()
    check_model(args)
    connect(None, num_cpus=(args.tensor_parallel_size + 1) * num_replicas)
    app = bind(config, args)
    serve.start(http_options={"host": host, "port": port})
    try:
        handle = serve.run(app, name=APP_NAME, route_prefix="/")
    except BaseException:  # a replica that cannot start, or Ctrl-C meanwhile
        serve.shutdown()
        raise
    if not blocking:
        return handle
    print(f"shardlm: serving {config.served_model_id()!r} at http://{host}:{port}/v1 (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return None


app = bind(LLMConfig(), EngineArgs())
"""`serve run driver.serve:app`: the embedded default model, built without reading any file."""
