"""`LLM`: vLLM's entry point, on a Ray cluster.

This module imports only Ray and plain-data modules: torch, the model code and the engine are
imported by `LLM(...)`, in a thread beside Ray's start (a local cluster takes seconds to start,
most of them waiting for its processes), with the arguments' validation and the model's discovery.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Union

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.connect import actor_env, connect, runtime_env_options, shutdown_local_cluster
from driver.config.generation_defaults import GenerationDefaults, load_generation_defaults, sampling_params_with_defaults
from driver.engine.outputs import RequestOutput
from driver.entrypoints import preflight
from parallel.errors import EngineDeadError, ShardLMError
from workers.sampling_params import SamplingParams

if TYPE_CHECKING:
    from driver.config.args import EngineArgs
    from driver.engine.actor import StartedRanks
    from driver.engine.metrics import Metric
    from driver.engine.report import LoadReport
    from workers.model_files import ModelFiles

PromptInput = Union[str, dict, list]
RUN_SLICE_S = 0.25
"""How long the driver actor steps before answering a blocking `generate` (finished requests only)."""
STREAM_SLICE_S = 0.05
DRIVER_ACTOR_TIMEOUT_S = 300.0
"""How long the driver actor may take to start (a process and its imports; on a remote cluster,
its runtime environment too) before `LLM(...)` gives up."""

logger = logging.getLogger(f"shardlm.{__name__}")


class LLM:
    """A tensor-parallel engine, ready when the constructor returns.

    `LLM(model, tensor_parallel_size=N, **engine_args)` validates the arguments and the parallel
    layout, joins Ray (RAY_ADDRESS, `ray_address`, or a new local cluster), and starts the driver
    actor, which places N ranks, loads each one's weight slices, sizes one KV pool per rank from a
    collective memory profile, and reports what each phase cost (`llm.load_report`).

    `show_progress`: progress bars on stderr, drawn by this process: one per phase of the start
    (weights: every rank's tensors, summed) and, unless `generate(use_tqdm=False)`, one over
    generation. The TQDM_DISABLE environment variable turns them all off.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        ray_address: str | None = None,
        placement_strategy: str = "PACK",
        placement_timeout_s: float = 60.0,
        show_progress: bool = True,
        **engine_args: Any,
    ) -> None:
        self._engine = None
        self._ranks: StartedRanks | None = None
        self.show_progress = show_progress
        self._tokenizer = None
        self._request_counter = itertools.count()
        args, found, discover, connected = discover_and_connect(model, engine_args, ray_address)
        self.config = args.create_cluster_engine_config(found)
        self.generation_defaults: GenerationDefaults = load_generation_defaults(args.generation_config, self.config.model)
        logger.info(
            "starting an engine: %s, tensor_parallel_size=%d, %s on %s, max_model_len=%d",
            self.config.model.model or "the embedded default",
            args.tensor_parallel_size,
            self.config.model.dtype,
            self.config.model.device,
            self.config.model.max_model_len,
        )
        self.load_report: LoadReport = self._start(placement_strategy, placement_timeout_s)
        download = found[0].download_seconds
        first = {"discover": discover - download, "download": download} if found[0].source == "hub" else {"discover": discover}
        self.load_report.phases = {**first, **self.load_report.phases}
        self.load_report.connect_seconds = connected
        self.load_report.generation_defaults = self.generation_defaults
        logger.info(
            "engine ready in %.1f s: %d KV-cache blocks of %d tokens per rank",
            sum(self.load_report.phases.values()),
            self.load_report.num_blocks,
            self.load_report.block_size,
        )

    def _start(self, placement_strategy: str, placement_timeout_s: float) -> LoadReport:
        """Start the driver actor and, beside it, the ranks it then takes over (their actors start
        while it does); its load report, with the driver actor's start as a phase."""
        from driver.engine.actor import EngineActor, start_ranks

        env = actor_env()
        current = ray.util.get_current_placement_group()
        self._engine = EngineActor.options(**runtime_env_options(env)).remote(self.config, env, current, placement_strategy)
        try:
            self._ranks = start_ranks(self.config, env, current, placement_strategy, placement_timeout_s)
            started = time.perf_counter()
            self._wait_driver_actor()
            booted = time.perf_counter() - started
            report = self._wait_started(self._engine.start.remote(placement_timeout_s, self._ranks))
        except BaseException:
            self._kill_engine()
            raise
        report.phases = {"placement": report.phases.pop("placement"), "driver_actor": booted, **report.phases}
        return report

    def _wait_driver_actor(self) -> None:
        """Until the driver actor is up (its process and imports; the ranks start meanwhile)."""
        try:
            _result(self._engine.progress.remote(), timeout_s=DRIVER_ACTOR_TIMEOUT_S)
        except GetTimeoutError:
            raise EngineDeadError(
                f"the engine's driver actor did not start within {DRIVER_ACTOR_TIMEOUT_S:.0f} s; look at `ray status` "
                "and the cluster's logs"
            ) from None

    def _wait_started(self, start: ray.ObjectRef) -> LoadReport:
        """The driver actor's answer to `start`, drawing the start's progress bars meanwhile."""
        from driver.engine.progress import POLL_S, StartBars, bars_enabled

        if not bars_enabled(self.show_progress):
            return _result(start)
        bars = StartBars()
        try:
            while not ray.wait([start], timeout=POLL_S)[0]:
                try:
                    bars.update(ray.get(self._engine.progress.remote(), timeout=10))
                except GetTimeoutError:
                    continue
                except (RayActorError, RayTaskError):
                    break  # the driver actor is gone: `start` says why
            report = _result(start)
            with contextlib.suppress(GetTimeoutError, RayActorError, RayTaskError):
                bars.update(ray.get(self._engine.progress.remote(), timeout=10))  # every bar full
            return report
        finally:
            bars.close()

    # -- generation ---------------------------------------------------------------------------

    def generate(
        self,
        prompts: PromptInput,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs in the order of the prompts.

        `prompts`: a string, a {"prompt": str} or {"prompt_token_ids": [...]} dict, a list of
        token ids, or a list of any of these. `sampling_params`: one for all, or one per prompt,
        each used as it is (default: `get_default_sampling_params()`). `use_tqdm`: a "Processed
        prompts" bar on stderr (default: the LLM's `show_progress`).
        """
        request_ids = self._submit(normalize_prompts(prompts), sampling_params)
        return self._collect(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"} messages) or a list of them,
        rendered by the tokenizer's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_ids = self._render_chat(conversations, chat_template, add_generation_prompt, chat_template_kwargs)
        return self.generate([{"prompt_token_ids": ids} for ids in token_ids], sampling_params, use_tqdm)

    def stream_chat(
        self,
        messages: list[dict],
        sampling_params: SamplingParams | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> Iterator[RequestOutput]:
        """`chat` for one conversation, streamed as `stream` does: its output (cumulative text)
        as tokens arrive, the last with finished=True."""
        token_ids = self._render_chat([messages], chat_template, add_generation_prompt, chat_template_kwargs)[0]
        return self.stream({"prompt_token_ids": token_ids}, sampling_params)

    def _render_chat(
        self, conversations: list[list[dict]], chat_template: str | None, add_generation_prompt: bool, kwargs: dict | None
    ) -> list[list[int]]:
        return _result(self._live_engine().render_chat.remote(conversations, chat_template, add_generation_prompt, kwargs or {}))

    def stream(
        self, prompts: PromptInput, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> Iterator[RequestOutput]:
        """Yield each request's output (cumulative text and tokens) as its tokens arrive; the last
        one for each request has finished=True. Leaving the loop early aborts what is left."""
        pending = set(self._submit(normalize_prompts(prompts), sampling_params))
        try:
            while pending:
                for out in _result(self._live_engine().run.remote(STREAM_SLICE_S, True)):
                    if out.finished:
                        pending.discard(out.request_id)
                    yield out
        finally:
            if pending and self._engine is not None:
                _result(self._engine.abort.remote(sorted(pending)))

    def get_default_sampling_params(self) -> SamplingParams:
        """What a request without sampling parameters gets: the model's generation_config.json
        defaults (temperature, top_p, top_k, repetition_penalty, max_new_tokens as max_tokens) over
        SamplingParams' own, unless the engine was started with generation_config="vllm"."""
        return sampling_params_with_defaults({}, self.generation_defaults)

    def stats(self) -> dict[str, int]:
        """The engine's counters: steps, preemptions, running and waiting sequences, free blocks."""
        return _result(self._live_engine().stats.remote())

    def get_metrics(self) -> list[Metric]:
        """vLLM's engine metrics under `shardlm:` names, now (`driver.engine.metrics`: gauges,
        counters and histograms, each with its labels); the same figures go to Ray's metrics."""
        return _result(self._live_engine().get_metrics.remote())

    def get_tokenizer(self) -> Any:
        """The model's tokenizer, loaded in this process on first use."""
        if self._tokenizer is None:
            from driver.engine.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.config.model)
        return self._tokenizer

    def _submit(self, prompts: list[tuple[str | None, list[int] | None]], sampling_params: Any) -> list[str]:
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling parameters: give one, or one per prompt")
        request_ids = [str(next(self._request_counter)) for _ in prompts]
        requests = [(rid, text, ids, p) for rid, (text, ids), p in zip(request_ids, prompts, params)]
        _result(self._live_engine().add_requests.remote(requests))
        return request_ids

    def _collect(self, request_ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        from driver.engine.progress import bars_enabled, progress_bar

        done: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        show = bars_enabled(self.show_progress if use_tqdm is None else use_tqdm)
        with progress_bar(total=len(request_ids), desc="Processed prompts", disable=not show, unit="prompt") as bar:
            prompt_tokens, generated, started = 0, 0, time.perf_counter()
            while len(done) < len(wanted):
                finished = [o for o in _result(self._live_engine().run.remote(RUN_SLICE_S, False)) if o.request_id in wanted]
                for out in finished:
                    done[out.request_id] = out
                    prompt_tokens += len(out.prompt_token_ids)
                    generated += sum(len(c.token_ids) for c in out.outputs)
                seconds = max(1e-9, time.perf_counter() - started)
                bar.set_postfix_str(
                    f"est. speed input: {prompt_tokens / seconds:.1f} toks/s, output: {generated / seconds:.1f} toks/s",
                    refresh=False,
                )
                bar.update(len(finished))
        return [done[rid] for rid in request_ids]

    def prompt_logits(self, prompt_token_ids: list[list[int]]) -> list[Any]:
        """Logits [len(prompt), vocab] at every position of each prompt (float32, on the CPU): for
        checking the engine against a reference."""
        return _result(self._live_engine().prompt_logits.remote(prompt_token_ids))

    def sleep(self, level: int = 1) -> None:
        """Give the devices back between jobs, as vLLM's `sleep`: level 1 moves every rank's weights
        to host memory (pinned on CUDA) and frees the KV pool; level 2 drops the weights too.
        Requests are refused (`EngineAsleepError`) until `wake_up()`; asleep already: nothing happens."""
        _result(self._live_engine().sleep.remote(level))

    def wake_up(self) -> None:
        """Restore what `sleep` freed (level 2: the weights loaded again through the pipeline) and
        the same KV pool; the load report gains a "wake" phase. Awake already: nothing happens."""
        seconds = _result(self._live_engine().wake_up.remote())
        if seconds:
            self.load_report.phases["wake"] = seconds

    def save_sharded_state(self, path: str, pattern: str | None = None, max_size: int | None = None) -> None:
        """Write every rank's final tensors (sliced, and quantized where the engine quantizes) to
        `path` as vLLM's sharded_state layout, with the config, tokenizer and a manifest, so that
        `LLM(path, tensor_parallel_size=<the same>)` loads them with no slicing or quantizing.
        `max_size`: the most bytes per file (default 5 GiB). `pattern`: vLLM's file-name pattern,
        which shardlm fixes to model-rank-{rank}-part-{part}.safetensors (any other is refused)."""
        if pattern not in (None, "model-rank-{rank}-part-{part}.safetensors"):
            raise ValueError(f"pattern={pattern!r}: shardlm writes model-rank-{{rank}}-part-{{part}}.safetensors only")
        _result(self._live_engine().save_sharded_state.remote(str(path), max_size))

    def shutdown(self) -> None:
        """Free the workers, their device memory and the placement group. Safe to call twice."""
        if self._engine is None:
            return
        try:
            ray.get(self._engine.shutdown.remote(), timeout=60)
        except Exception as exc:  # the engine is going away either way
            logger.info("engine shutdown: %s", exc)
        self._kill_engine()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def _live_engine(self) -> Any:
        if self._engine is None:
            raise EngineDeadError("this LLM has been shut down; create a new one")
        return self._engine

    def _kill_engine(self) -> None:
        """End the driver actor, and the ranks this process started for it (this process owns
        their actors: they would outlive the driver actor)."""
        if self._engine is not None:
            ray.kill(self._engine, no_restart=True)
            self._engine = None
        if self._ranks is not None:
            self._ranks.release()
            self._ranks = None


def discover_and_connect(
    model: str | None, engine_args: dict[str, Any], ray_address: str | None
) -> tuple[EngineArgs, tuple[ModelFiles, Any, Any], float, float]:
    """(the arguments, the model found, seconds discovering it, seconds joining Ray).

    Without a Ray connection yet, the imports, the validation and the discovery run in a thread
    while this one joins Ray or starts a local cluster (which must be the main thread's doing).
    A local model that is missing is still refused before any cluster starts; a mistake found
    later shuts down the local cluster started for it.
    """
    if ray.is_initialized():
        return (*_discover(model, engine_args), 0.0)
    preflight.check_sizes(engine_args)
    preflight.check_device(engine_args.get("device", "auto"), ray_address)
    preflight.check_local_model(model, engine_args)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shardlm-discover") as pool:
        discovering = pool.submit(_discover, model, engine_args)
        started = time.perf_counter()
        try:
            connect(ray_address, num_cpus=preflight.requested_ranks(engine_args))
        except BaseException:
            discovering.result()  # a mistake in the arguments first: it is the user's to fix either way
            raise
        connected = time.perf_counter() - started
        try:
            args, found, discover = discovering.result()
        except BaseException:
            shutdown_local_cluster()  # started for an engine that cannot start
            raise
    return args, found, discover, connected


def _discover(model: str | None, engine_args: dict[str, Any]) -> tuple[EngineArgs, tuple[ModelFiles, Any, Any], float]:
    """Validate the arguments, find the model and check its parallel layout (after importing
    what that and the engine need); the seconds it took, the imports left out."""
    import driver.engine.actor  # noqa: F401  (needed next; imported here, beside Ray's start)
    from driver.config.args import EngineArgs

    started = time.perf_counter()
    args = EngineArgs(model=model, **engine_args)
    found = args.find_checked_model()
    return args, found, time.perf_counter() - started


def _result(ref: ray.ObjectRef, timeout_s: float | None = None) -> Any:
    """ray.get, with the engine's own shardlm errors raised as themselves."""
    try:
        return ray.get(ref, timeout=timeout_s)
    except RayTaskError as exc:
        if isinstance(exc.cause, (ShardLMError, ValueError, TypeError)):
            raise exc.cause from None
        raise
    except RayActorError as exc:
        raise EngineDeadError(f"the engine's driver actor died: {exc}") from exc


def normalize_prompts(prompts: PromptInput) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) for each prompt, one of the two None."""
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    normalized = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            normalized.append((prompt, None))
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            normalized.append((prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]))
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            normalized.append((prompt["prompt"], None))
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            normalized.append((None, list(prompt)))
        else:
            raise TypeError(
                f"prompt {i} is a {type(prompt).__name__}; give a string, a list of token ids, or a dict with "
                "'prompt' or 'prompt_token_ids'"
            )
    return normalized
