"""The driver actor: it places the ranks, starts their workers, loads, sizes the KV cache, and
from then on drives every worker through one collective-call helper."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray

from cluster.logs import configure_actor_logging
from cluster.placement import Placement, acquire_placement, release_placement
from cluster.worker_group import WorkerGroup
from driver.engine.core import CoreRequest, EngineCore
from driver.engine.metrics import EngineMetrics, Metric
from driver.engine.output_processor import OutputProcessor
from driver.engine.outputs import RequestOutput
from driver.engine.processor import Processor, PromptRequest
from driver.engine.progress import StartProgress
from driver.engine.report import LoadReport
from parallel.errors import EngineAsleepError, EngineDeadError, SchedulingStalled
from workers.batch import Batch, StepResult
from workers.config import EngineConfig
from workers.cuda_graphs import cuda_graphs_wanted, decode_buckets
from workers.kv_cache import choose_num_blocks
from workers.model_files import DEFAULT_MODEL_NAME
from workers.sampling_params import SamplingParams

logger = logging.getLogger(f"shardlm.{__name__}")

TIMEOUTS_S = {
    "init_device": 300.0,
    "load_model": 3600.0,
    "profile_memory": 1800.0,
    "allocate_kv_cache": 300.0,
    "execute_model": 600.0,
}
"""Deadlines of the start-up calls: a rank that has not answered by then is reported, not waited for."""


class Engine:
    """Runs in the driver actor (`EngineActor`); one per `LLM`."""

    def __init__(self, config: EngineConfig, env: dict[str, str], placement_group: Any = None, strategy: str = "PACK") -> None:
        if ray.get_runtime_context().get_actor_id() is not None:
            configure_actor_logging()
        self.config = config
        self.env = env
        self.current_group = placement_group
        self.strategy = strategy
        self.placement: Placement | None = None
        self.workers: WorkerGroup | None = None
        self.tokenizer: Any = None
        self.core: EngineCore | None = None
        self.processor: Processor | None = None
        self.outputs: OutputProcessor | None = None
        self.dead: EngineDeadError | None = None
        self.sleep_level = 0
        """0 awake; 1 or 2 while asleep (`sleep`)."""
        self.blocked: str | None = None
        """After a step that scheduled nothing although requests are unfinished: what blocks them."""
        self.metrics: EngineMetrics | None = None
        """The engine's figures (`driver.engine.metrics`), from the end of the warm-up on."""
        self.phase = ""
        """The start-up phase running ("placement", "workers", "weights", ...), "ready" after."""

    def __repr__(self) -> str:
        return "shardlm-engine"  # Ray's prefix of this actor's log lines: (shardlm-engine pid=...)

    def start(self, placement_timeout_s: float = 60.0, ranks: StartedRanks | None = None) -> LoadReport:
        """Bring every rank up; on any failure release everything and raise what went wrong.
        `ranks`: placed and started by the caller already (`start_ranks`), else placed here."""
        try:
            return self._start(placement_timeout_s, ranks)
        except BaseException:
            self.shutdown(graceful=False)
            raise

    def _start(self, placement_timeout_s: float, ranks: StartedRanks | None) -> LoadReport:
        config, phases = self.config, {}
        tokenizer = None if config.model.skip_tokenizer_init else self._load_tokenizer_meanwhile()
        if ranks is None:
            self.phase = "placement"
            ranks = start_ranks(config, self.env, self.current_group, self.strategy, placement_timeout_s)
        self.placement, self.workers = ranks.placement, ranks.workers
        phases["placement"] = ranks.placement_seconds
        with self._phase(phases, "workers"):
            address, port = self.workers.call_actor("rendezvous_address", ranks=[0], timeout_s=TIMEOUTS_S["init_device"])[0]
            nodes = self.node_ids()
            threads = [(address, port, n) for n in self._cpu_threads(nodes)]
            self.workers.call("init_device", rank_args=threads, timeout_s=TIMEOUTS_S["init_device"])
        with self._phase(phases, "weights"):
            weights = self.workers.call("load_model", timeout_s=TIMEOUTS_S["load_model"])
        with self._phase(phases, "profile"):
            shares = self._node_shares(nodes)
            profiles = self.workers.call("profile_memory", rank_args=shares, timeout_s=TIMEOUTS_S["profile_memory"])
        with self._phase(phases, "kv_allocation"):
            num_blocks = choose_num_blocks(config, profiles)
            kv_bytes = self.workers.call("allocate_kv_cache", num_blocks, timeout_s=TIMEOUTS_S["allocate_kv_cache"])
        if tokenizer is not None:
            with self._phase(phases, "tokenizer"):  # what is left of it after the workers' phases
                self.tokenizer = tokenizer.result()
        self.core = EngineCore(config, num_blocks, self._submit)
        self.processor, self.outputs = Processor(config, self.tokenizer), OutputProcessor(self.tokenizer)
        with self._phase(phases, "warmup"):
            graph_bytes = self._capture_cuda_graphs()
            self.workers.set_up_step_dispatch(config.model.device, TIMEOUTS_S["execute_model"])
            self._warm_up()
        self.metrics = EngineMetrics(config.model.model or DEFAULT_MODEL_NAME, self.core.metric_counts)
        self.phase = "ready"
        return LoadReport(
            model=config.model.model or f"default ({config.model.gguf_file})",
            phases=phases,
            ranks=weights,
            memory=profiles,
            num_blocks=num_blocks,
            block_size=config.cache.block_size,
            kv_cache_bytes=kv_bytes,
            nodes=nodes,
            step_dispatch=self.workers.step_dispatch,
            cuda_graph_bytes=graph_bytes,
        )

    def _capture_cuda_graphs(self) -> list[int]:
        """Every rank's decode-step CUDA graphs (`workers.cuda_graphs`): their bytes per rank, or
        [] where they are off (and why is logged)."""
        wanted, why = cuda_graphs_wanted(self.config)
        if not wanted:
            if self.config.model.device == "cuda":
                logger.info("decode steps run eagerly (%s)", why)
            return []
        graph_bytes = self.workers.call("capture_cuda_graphs", timeout_s=TIMEOUTS_S["profile_memory"])
        logger.info(
            "CUDA graphs captured at %d batch sizes: %.0f MiB on rank 0",
            len(decode_buckets(self.config.scheduler.max_num_seqs)),
            graph_bytes[0] / 2**20,
        )
        return graph_bytes

    def _warm_up(self) -> None:
        """One short request through a prompt step and a decode step before the engine says it is
        ready: a rank that cannot run a step fails the start, and on CUDA the kernels for small
        batches compile here rather than in the first user request (larger batches' tile sizes
        still compile when they first come)."""
        if self.config.model.max_model_len < 2:  # no prompt fits: nothing to warm up with
            return
        params = SamplingParams(temperature=0.0, max_tokens=1 if self.config.model.max_model_len <= 2 else 2, ignore_eos=True)
        prompt = [0] * max(1, min(4, self.config.model.max_model_len - 2))
        self.add_requests([("shardlm-warmup", None, prompt, params)])
        while self.has_unfinished():
            self.step()
        core = self.core
        core.steps = core.preemptions = core.prompt_tokens = core.generation_tokens = 0
        core.scheduler.blocks.queried_tokens = core.scheduler.blocks.hit_tokens = 0

    @contextlib.contextmanager
    def _phase(self, phases: dict[str, float], name: str) -> Iterator[None]:
        self.phase = name
        with _timed(phases, name):
            yield

    @ray.method(concurrency_group="progress")
    def progress(self, timeout_s: float = 1.0) -> StartProgress:
        """Where the start has got, with each rank's own progress: answered by a second thread
        of this actor while `start` runs, so the caller's progress bars can follow it."""
        workers = self.workers
        ranks = workers.poll_progress(timeout_s) if workers is not None else []
        return StartProgress(phase=self.phase, world_size=self.config.parallel.tensor_parallel_size, ranks=ranks)

    def _load_tokenizer_meanwhile(self) -> concurrent.futures.Future:
        """Load the tokenizer in a thread while the workers start and load (the driver only waits then)."""
        from driver.engine.tokenizer import load_tokenizer

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        future = pool.submit(load_tokenizer, self.config.model)
        pool.shutdown(wait=False)
        return future

    @staticmethod
    def _node_shares(nodes: list[str]) -> list[tuple[int, int | None]]:
        """(ranks on the same node, the node's Ray memory resource) for each rank."""
        per_node = Counter(nodes)
        memory = _node_resource("memory")
        return [(per_node[node], int(memory[node]) if memory.get(node) else None) for node in nodes]

    def _cpu_threads(self, nodes: list[str]) -> list[int | None]:
        """On CPU, each rank's torch threads: its node's CPUs shared among the ranks there."""
        if self.config.model.device != "cpu":
            return [None] * len(nodes)
        per_node, cpus = Counter(nodes), _node_resource("CPU")
        return [max(1, int(cpus.get(node) or 1) // per_node[node]) for node in nodes]

    # -- generation ---------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"{self.dead}; every request in flight is lost: create a new LLM")

    def add_requests(self, requests: list[PromptRequest], length_field: str | None = None) -> None:
        """Queue requests (id, text, token ids, params), tokenizing text; none is queued unless all
        are valid. `length_field` (what the caller calls the prompt: "prompt", "messages"): also
        refuse a prompt whose max_tokens would run past max_model_len, as vLLM's server does."""
        self._check_alive()
        if self.sleep_level:
            raise EngineAsleepError(
                f"the engine is asleep (sleep level {self.sleep_level}): call wake_up() before sending requests"
            )
        core_requests = self.processor.process(requests, time.time())
        if length_field is not None:
            for core in core_requests:
                check_requested_length(core, self.config.model.max_model_len, length_field)
        self.core.add_requests(core_requests)
        for (_, text, _, _), core in zip(requests, core_requests):
            self.outputs.add(core.request_id, text, core.prompt_token_ids, core.params, core.arrival_time)

    def render_chat(
        self, conversations: list[list[dict]], chat_template: str | None, add_generation_prompt: bool, kwargs: dict
    ) -> list[list[int]]:
        """Each conversation through the tokenizer's chat template, as token ids."""
        return self.processor.render_chat(conversations, chat_template, add_generation_prompt, kwargs)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One step of the core, its outputs through the output processor; completions that
        reached a stop string end in the core before the next step is scheduled. The requests
        that changed (only the finished ones with `finished_only`).

        With async scheduling the ranks are running the next step meanwhile: the outputs are
        processed while they do, and a completion that reached a stop string has one more token
        computed there, which the core drops."""
        outputs, hits, failures = self.outputs.process(self.core.step(), finished_only)
        for request_id, index, stop in hits:
            self.core.finish(request_id, index, "stop", stop)
        for request_id, error in failures:
            self.core.fail(request_id, error)
        for out in outputs:
            if out.finished:
                self._finished(out)
        self.blocked = None if outputs else self.core.blocked()
        if self.metrics is not None:
            self.metrics.maybe_flush()
        return outputs

    def _finished(self, out: RequestOutput) -> None:
        if out.error is not None:
            logger.warning("request %s failed, the others go on: %s", out.request_id, out.error)
        if self.metrics is not None:
            self.metrics.finished(out)

    def get_metrics(self) -> list[Metric]:
        """vLLM's engine metrics under shardlm: names (`driver.engine.metrics`), now."""
        return self.metrics.snapshot() if self.metrics is not None else []

    def _submit(self, batch: Batch) -> Callable[[], StepResult]:
        """Send a step to every rank; what waits for rank 0's result."""
        self._check_alive()
        try:
            pending = self.workers.submit_step(batch)
        except Exception as exc:
            raise self._died(exc) from exc

        def result() -> StepResult:
            try:
                return pending.result(timeout_s=TIMEOUTS_S["execute_model"])
            except Exception as exc:
                raise self._died(exc) from exc

        return result

    def _died(self, exc: Exception) -> EngineDeadError:
        """A failure on a rank ends the engine: the ranks' caches and process group are in an
        unknown state, so every later call gets EngineDeadError."""
        self.dead = EngineDeadError(f"the engine stopped: a worker failed during a step: {exc}")
        return self.dead

    def run(self, max_seconds: float, stream: bool) -> list[RequestOutput]:
        """Step until `max_seconds` have passed or nothing is left: the finished requests (with
        `stream`, every request that changed, at its latest)."""
        deadline = time.monotonic() + max_seconds
        changed: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step(finished_only=not stream):
                if stream or out.finished:
                    changed[out.request_id] = out
            if self.blocked is not None:  # nothing here can change that: say so rather than spin
                raise SchedulingStalled(f"the engine cannot schedule anything: {self.blocked}; abort those requests")
            if time.monotonic() >= deadline or (stream and changed):
                break
        return list(changed.values())

    def abort(self, request_ids: list[str]) -> None:
        if self.metrics is not None:
            self.metrics.aborted(sum(1 for r in request_ids if r in self.core.requests))
        self.core.abort(request_ids)
        self.outputs.abort(request_ids)

    # -- sleeping, and sharded copies ----------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep levels: 1 moves every rank's weights to host memory and frees the KV pool;
        2 drops the weights too. Asleep already: nothing happens. Refused while requests are unfinished."""
        self._check_alive()
        if level not in (1, 2):
            raise ValueError(f"sleep level {level!r} is not 1 (weights kept in host memory) or 2 (weights dropped)")
        if self.sleep_level:
            logger.info("sleep(level=%d): the engine is asleep already (level %d)", level, self.sleep_level)
            return
        if self.has_unfinished():
            raise ValueError(f"sleep() with {len(self.core.requests)} request(s) unfinished: let them finish or abort them first")
        self.workers.call("sleep", level, timeout_s=TIMEOUTS_S["allocate_kv_cache"])
        self.sleep_level = level

    def wake_up(self) -> float:
        """Restore what `sleep` freed on every rank (after level 2, a load through the pipeline) and
        the same KV pool; the seconds it took (0 when the engine was awake)."""
        self._check_alive()
        if not self.sleep_level:
            return 0.0
        start = time.perf_counter()
        self.workers.call("wake_up", timeout_s=TIMEOUTS_S["load_model"])
        self.sleep_level = 0
        return time.perf_counter() - start

    def save_sharded_state(self, path: str, max_part_bytes: int | None = None) -> None:
        """Every rank's final tensors in `path` (vLLM's sharded_state layout), with the model's
        config, tokenizer and a manifest beside them; `path` must be storage every rank's node sees."""
        from workers.sharded_state import save_model_files

        self._check_alive()
        if self.sleep_level:
            raise EngineAsleepError("save_sharded_state() needs the weights: call wake_up() first")
        parts = self.workers.call("save_sharded_state", path, max_part_bytes, timeout_s=TIMEOUTS_S["load_model"])
        save_model_files(self.config, path, dict(enumerate(parts)))
        if self.tokenizer is not None and self.config.model.gguf_file is not None:
            self.tokenizer.save_pretrained(path)

    def stats(self) -> dict[str, int]:
        return self.core.stats()

    def node_ids(self) -> list[str]:
        """The Ray node each rank runs on."""
        return self.workers.call_actor("node_id")

    def prompt_logits(self, prompts: list[list[int]]) -> list[Any]:
        """Full-vocabulary logits at every position of each prompt, computed by the ranks together."""
        return self.workers.call("prompt_logits", prompts, timeout_s=TIMEOUTS_S["profile_memory"])[0]

    def shutdown(self, graceful: bool = True) -> None:
        """End the workers (asking them to leave their process group first, when `graceful`) and
        release the placement group; safe to call twice."""
        if self.workers is not None:
            if graceful:
                self.workers.shutdown()
            else:
                self.workers.kill()
            self.workers = None
        release_placement(self.placement)
        self.placement = None


def check_requested_length(request: CoreRequest, max_model_len: int, field: str) -> None:
    """A ValueError, in vLLM's words and with both numbers, when the prompt plus max_tokens runs
    past max_model_len (max_tokens None: up to max_model_len, which always fits)."""
    prompt, wanted = len(request.prompt_token_ids), request.params.max_tokens
    if wanted is not None and prompt + wanted > max_model_len:
        raise ValueError(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt + wanted} tokens ({prompt} in the {field}, {wanted} in the completion). "
            f"Please reduce the length of the {field} or completion."
        )


EngineActor = ray.remote(num_cpus=0, concurrency_groups={"progress": 1})(Engine)


@dataclass
class StartedRanks:
    """The ranks' bundles and worker actors, started before anyone waits for them."""

    placement: Placement
    workers: WorkerGroup
    placement_seconds: float
    """How long placing the bundles took."""

    def release(self) -> None:
        """End the actors and release the bundles (for a start that fails before the engine has them)."""
        self.workers.kill()
        release_placement(self.placement)


def start_ranks(config: EngineConfig, env: dict[str, str], current_group: Any, strategy: str, timeout_s: float) -> StartedRanks:
    """Place one bundle per rank and start every rank's worker actor, without waiting for the
    actors: they start (a process, its imports) while the caller goes on. `env`: the variables
    the actors need in their runtime environment (`cluster.connect.actor_env`)."""
    started = time.perf_counter()
    use_gpu = config.model.device == "cuda"
    placement = acquire_placement(config.parallel.tensor_parallel_size, use_gpu, strategy, timeout_s, current_group)
    seconds = time.perf_counter() - started
    try:
        workers = WorkerGroup.start(config, placement, env)
    except BaseException:
        release_placement(placement)
        raise
    logger.debug("placement took %.2f s", seconds)
    return StartedRanks(placement, workers, seconds)


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = time.perf_counter() - start
        logger.debug("%s took %.2f s", name, phases[name])


def _node_resource(name: str) -> dict[str, float]:
    return {n["NodeID"]: n.get("Resources", {}).get(name) for n in ray.nodes() if n.get("Alive")}
