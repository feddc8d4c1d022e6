"""OpenAI's completions and chat completions over an `AsyncEngine`.

Request bodies are decoded and type-checked by msgspec (an unknown or missing field, or a value of
the wrong type, is refused with the field's name); the values themselves are checked by
`SamplingParams`, and prompts by the engine. Responses, and the server-sent events of a streamed
response, have OpenAI's shapes. Nothing here knows about HTTP: `serve.py` maps `OpenAIError` and
the engine's errors to status codes with `error_response`.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import msgspec

from driver.config.generation_defaults import GenerationDefaults, sampling_params_with_defaults
from driver.engine.outputs import CompletionOutput, Logprob, RequestOutput
from driver.entrypoints.async_engine import AsyncEngine, Prompt, RequestStream
from parallel.errors import EngineAsleepError, EngineDeadError
from workers.sampling_params import SamplingParams

logger = logging.getLogger(f"shardlm.{__name__}")

Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
"""A 64-bit seed (a larger one would fail in the sampler, and end the engine)."""


class OpenAIError(Exception):
    """An error to answer with `status` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# -- requests ------------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    """Send a last chunk with the usage of the whole request."""


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The fields both endpoints share: OpenAI's, then vLLM's extra sampling fields."""

    model: str
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    spaces_between_special_tokens: bool | None = None
    logit_bias: dict[str, float] | None = None
    """Token id (a string of digits, as JSON keys are) -> a bias in [-100, 100] added to its logit."""
    vllm_xargs: dict[str, str | int | float | bool] | None = None
    """vLLM's extra arguments for custom sampling (`SamplingParams.extra_args`)."""


SAMPLING_FIELDS = (
    "n",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "spaces_between_special_tokens",
    "logit_bias",
)
"""Request fields that are SamplingParams fields of the same name and meaning (None: not set, the
model's default or else SamplingParams' own)."""


class CompletionRequest(_Request, kw_only=True, forbid_unknown_fields=True):
    prompt: str | list[str | int | list[int]]
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    max_tokens: int | None = None
    """None: the model's max_new_tokens, else 16, as OpenAI's default."""
    logprobs: int | None = None
    """Return the log-probabilities of this many most likely tokens at each step."""
    echo: bool = False
    """Put the prompt before each completion's text (and, with logprobs, its tokens' logprobs)."""
    best_of: int | None = None
    """Generate this many completions per prompt and return the n with the highest cumulative
    logprob (vLLM's ranking); not with stream. None: n."""


class ContentPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request, kw_only=True, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    """OpenAI's newer name of max_tokens; None for both: the model's max_new_tokens, else until
    max_model_len."""
    logprobs: bool = False
    top_logprobs: int | None = None
    """With logprobs: how many of the most likely tokens to give at each step."""
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


def decode(body: bytes, kind: type) -> Any:
    """The body as `kind`, or a 400 naming the field that is missing, unknown or mistyped."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise OpenAIError(400, f"invalid request: {exc}", param=_field_of(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}") from None


def _field_of(message: str) -> str | None:
    found = re.search(r"at `\$\.(\w+)", message) or re.search(r"field `(\w+)`", message)
    return found.group(1) if found else None


def sampling_params(
    request: _Request, defaults: GenerationDefaults | None = None, fallback: dict[str, Any] | None = None, **fields: Any
) -> SamplingParams:
    """SamplingParams from the request's fields and `fields` (None: not set), else the model's
    `defaults`, else `fallback`, else SamplingParams' own; its own checks give a 400."""
    given = {name: getattr(request, name) for name in SAMPLING_FIELDS}
    if request.vllm_xargs is not None:
        given["extra_args"] = dict(request.vllm_xargs)
    try:
        return sampling_params_with_defaults({**given, **fields}, defaults or GenerationDefaults(), fallback)
    except ValueError as exc:
        first = str(exc).split()[0]
        raise OpenAIError(400, str(exc), param=first if first in SamplingParams.__struct_fields__ else None) from None


def completion_prompts(prompt: str | list) -> list[Prompt]:
    """Each prompt of a completion request as (text, token ids)."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [(None, prompt)]
    if prompt and all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if prompt and all(isinstance(p, list) for p in prompt):
        return [(None, p) for p in prompt]
    raise OpenAIError(
        400, "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids", param="prompt"
    )


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them: text content only."""
    if not messages:
        raise OpenAIError(400, "messages must hold at least one message", param="messages")
    rendered = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise OpenAIError(400, "only text content parts ({'type': 'text', 'text': ...}) are supported", param="messages")
            content = "".join(part.text for part in content)
        entry = {"role": message.role, "content": content or ""}
        if message.name is not None:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


# -- serving ---------------------------------------------------------------------------------------


class OpenAIServing:
    """The OpenAI endpoints of one served model. Each endpoint returns a JSON-ready dict, or for
    `stream: true` an async iterator of server-sent-event bytes. `defaults`: the model's sampling
    defaults, for the fields a request leaves out (`load_generation_defaults`)."""

    def __init__(
        self, engine: AsyncEngine, model_id: str, max_model_len: int, vocab_size: int, defaults: GenerationDefaults | None = None
    ) -> None:
        self.engine, self.model_id, self.max_model_len, self.vocab_size = engine, model_id, max_model_len, vocab_size
        self.defaults = defaults or GenerationDefaults()
        self.created = int(time.time())
        self.tokenizer = getattr(getattr(engine, "engine", None), "tokenizer", None)

    def _decode(self, token_ids: list[int]) -> str:
        """Token ids as text (a prompt given as ids, echoed back); "" without a tokenizer."""
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    def models(self) -> dict[str, Any]:
        card = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "shardlm",
            "max_model_len": self.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def completions(self, body: bytes) -> dict[str, Any] | AsyncIterator[bytes]:
        request = decode(body, CompletionRequest)
        self._check_model(request.model)
        prompts = completion_prompts(request.prompt)
        best_of = _best_of(request)
        fields: dict[str, Any] = {"max_tokens": request.max_tokens, "logprobs": request.logprobs}
        if best_of is not None:  # every completion's cumulative logprob ranks it
            fields.update(n=best_of, logprobs=request.logprobs or 0)
        if request.echo and request.logprobs is not None:
            fields["prompt_logprobs"] = request.logprobs
        params = self._sampling_params(request, **fields)
        reply_id = _reply_id("cmpl")
        stream = await self._submit(prompts, params, reply_id, "prompt")
        n = (request.n or 1) if best_of is not None else params.n
        echo = self._decode if request.echo else None
        reply = _Reply(reply_id, "text_completion", self.model_id, stream, n, request.logprobs, echo=echo, best_of=best_of)
        if request.stream:
            return reply.chunks(_completion_choice, _include_usage(request))
        return await reply.whole(_completion_choice)

    async def chat(self, body: bytes) -> dict[str, Any] | AsyncIterator[bytes]:
        request = decode(body, ChatCompletionRequest)
        self._check_model(request.model)
        messages = chat_messages(request.messages)
        max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        if request.top_logprobs is not None and not request.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = self._sampling_params(request, fallback={"max_tokens": None}, max_tokens=max_tokens, logprobs=logprobs)
        token_ids = await self._render(messages, request)
        reply_id = _reply_id("chatcmpl")
        stream = await self._submit([(None, token_ids)], params, reply_id, "messages")
        reply = _Reply(reply_id, "chat.completion", self.model_id, stream, params.n, logprobs)
        if request.stream:
            return reply.chunks(_chat_choice, _include_usage(request))
        return await reply.whole(_chat_choice)

    def _sampling_params(self, request: _Request, fallback: dict[str, Any] | None = None, **fields: Any) -> SamplingParams:
        params = sampling_params(request, self.defaults, fallback, **fields)
        beyond = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if beyond:  # the sampler would index its logits with them, and fail the engine
            raise OpenAIError(
                400, f"stop_token_ids must be below the vocabulary size, {self.vocab_size}: got {beyond}", param="stop_token_ids"
            )
        return params

    async def _submit(self, prompts: list[Prompt], params: SamplingParams, reply_id: str, field: str) -> RequestStream:
        """The engine's requests, `<reply id>-<prompt index>`; a prompt it refuses (too long,
        empty, token ids outside the vocabulary) is a 400, with the engine's message."""
        try:
            return await self.engine.submit(prompts, params, reply_id, length_field=field)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param=field) from None

    async def _render(self, messages: list[dict[str, str]], request: ChatCompletionRequest) -> list[int]:
        try:
            rendered = await self.engine.render_chat([messages], request.add_generation_prompt, request.chat_template_kwargs)
        except EngineDeadError:
            raise
        except Exception as exc:  # the template refused these messages (roles out of order, ...)
            raise OpenAIError(
                400, f"the messages cannot be rendered with the model's chat template: {exc}", param="messages"
            ) from None
        return rendered[0]

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                param="model",
                code="model_not_found",
            )


def _best_of(request: CompletionRequest) -> int | None:
    """The request's best_of where it asks for more completions than it returns, else None."""
    n = request.n or 1
    if request.best_of is None or request.best_of == n:
        return None
    if request.best_of < n:
        raise OpenAIError(400, f"best_of ({request.best_of}) must be at least n ({n})", param="best_of")
    if request.stream:
        raise OpenAIError(400, "best_of cannot be used with stream: true", param="best_of")
    return request.best_of


def _reply_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _include_usage(request: _Request) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


class _Reply:
    """One response's outputs, whole or as chunks: choice `p * n + i` is completion i of prompt p.
    `top`: how many of the most likely tokens to give with each token's logprob; None: no logprobs.
    `echo`: put the prompt (as this function decodes a prompt given as ids) before each text.
    `best_of`: each request generated this many completions, of which the n with the highest
    cumulative logprob are given."""

    def __init__(
        self,
        reply_id: str,
        kind: str,
        model: str,
        stream: RequestStream,
        n: int,
        top: int | None,
        echo: Callable[[list[int]], str] | None = None,
        best_of: int | None = None,
    ) -> None:
        self.id, self.kind, self.model = reply_id, kind, model
        self.stream, self.n, self.top = stream, n, top
        self.echo, self.best_of = echo, best_of
        self.created = int(time.time())
        self.prompt_index = {rid: p for p, rid in enumerate(stream.request_ids)}

    def _envelope(self, object_kind: str, choices: list[dict], usage: dict | None = None) -> dict[str, Any]:
        body = {"id": self.id, "object": object_kind, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def _index(self, out: RequestOutput, c: CompletionOutput) -> int:
        return self.prompt_index[out.request_id] * self.n + c.index

    async def whole(self, choice: Any) -> dict[str, Any]:
        final: dict[str, RequestOutput] = {}
        try:
            async for out in self.stream:
                final[out.request_id] = out
        finally:
            self.stream.close()
        outputs = [final[rid] for rid in self.stream.request_ids]
        for out in outputs:
            _raise_failed(out)
        choices = []
        for out in outputs:
            prefix = self._echoed(out)
            for rank, c in enumerate(self._best(out)):
                logprobs = self._logprobs(c, 0, len(prefix), self._prompt_steps(out))
                choices.append(
                    choice(self.prompt_index[out.request_id] * self.n + rank, prefix + c.text, c.finish_reason, logprobs, False)
                )
        return self._envelope(self.kind, choices, _usage(outputs))

    def _best(self, out: RequestOutput) -> list[CompletionOutput]:
        """The completions to give: all of them, or with best_of the n best by cumulative logprob."""
        if self.best_of is None:
            return out.outputs
        return sorted(out.outputs, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[: self.n]

    def _echoed(self, out: RequestOutput) -> str:
        """The prompt's text where the request echoes it, else ""."""
        if self.echo is None:
            return ""
        return out.prompt if out.prompt is not None else self.echo(out.prompt_token_ids)

    def _prompt_steps(self, out: RequestOutput) -> list[tuple[int, dict[int, Logprob] | None]]:
        """The prompt's (token, logprobs) where the request echoes it with logprobs, else []."""
        if self.echo is None or out.prompt_logprobs is None:
            return []
        return list(zip(out.prompt_token_ids, out.prompt_logprobs))

    async def chunks(self, choice: Any, include_usage: bool) -> AsyncIterator[bytes]:
        chunk_kind = self.kind + (".chunk" if self.kind == "chat.completion" else "")
        sent: dict[int, tuple[int, int] | None] = {}  # choice index -> (characters, tokens) sent; None: finished
        final: dict[str, RequestOutput] = {}
        try:
            if self.kind == "chat.completion":
                roles = [_chat_role(i) for i in range(len(self.stream.request_ids) * self.n)]
                yield _sse(self._envelope(chunk_kind, roles))
            async for out in self.stream:
                _raise_failed(out)
                choices = [choice(*delta) for delta in self._deltas(out, sent)]
                if choices:
                    yield _sse(self._envelope(chunk_kind, choices))
                if out.finished:
                    final[out.request_id] = out
            if include_usage:
                yield _sse(self._envelope(chunk_kind, [], _usage(list(final.values()))))
        except Exception as exc:  # the status line has gone: the error travels as an event
            if not isinstance(exc, (OpenAIError, EngineDeadError)):
                logger.exception("streamed request %s failed", self.id)
            yield _sse(error_response(exc)[1])
        finally:
            self.stream.close()
        yield b"data: [DONE]\n\n"

    def _deltas(self, out: RequestOutput, sent: dict[int, tuple[int, int] | None]) -> list[tuple]:
        """(index, new text, finish reason, new logprobs, True) for each completion that changed."""
        deltas = []
        for c in out.outputs:
            index = self._index(out, c)
            if index in sent and sent[index] is None:
                continue
            first = index not in sent
            chars, tokens = sent.get(index) or (0, 0)
            if len(c.text) == chars and len(c.token_ids) == tokens and c.finish_reason is None and not (first and self.echo):
                continue
            sent[index] = None if c.finish_reason is not None else (len(c.text), len(c.token_ids))
            prefix = self._echoed(out) if first else ""
            prompt_steps = self._prompt_steps(out) if first else []
            logprobs = self._logprobs(c, tokens, len(prefix) + chars, prompt_steps)
            deltas.append((index, prefix + c.text[chars:], c.finish_reason, logprobs, True))
        return deltas

    def _logprobs(self, c: CompletionOutput, start: int, offset: int, prompt_steps: list | None = None) -> Any:
        """Logprobs of the tokens from `start` on (the text before them is `offset` characters),
        after those of the echoed prompt's tokens (`prompt_steps`, the first without one)."""
        if self.top is None or c.logprobs is None:
            return None
        steps = list(zip(c.token_ids[start:], c.logprobs[start:]))
        if self.kind == "chat.completion":
            return {"content": [_chat_logprob(token, entry, self.top) for token, entry in steps]}
        if prompt_steps:  # the echoed prompt comes first: the text starts with it
            return _completion_logprobs(prompt_steps + steps, self.top, 0, self.echo)
        return _completion_logprobs(steps, self.top, offset)


def _completion_choice(index: int, text: str, finish_reason: str | None, logprobs: Any, delta: bool) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_choice(index: int, text: str, finish_reason: str | None, logprobs: Any, delta: bool) -> dict[str, Any]:
    message = {"content": text} if delta else {"role": "assistant", "content": text}
    return {"index": index, "delta" if delta else "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def _chat_role(index: int) -> dict[str, Any]:
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _completion_logprobs(
    steps: list[tuple[int, dict[int, Logprob] | None]],
    top: int,
    offset: int,
    decode: Callable[[list[int]], str] | None = None,
) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, their logprobs, the top ones,
    offsets. An entry of None (an echoed prompt's first token, which nothing predicts) has no
    logprob and no top ones, as vLLM gives it."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, entry in steps:
        text = _token_text(token, entry, decode)
        tokens.append(text)
        token_logprobs.append(entry[token].logprob if entry is not None else None)
        tops.append({(e.decoded_token or ""): e.logprob for e in _ranked(entry, top)} if entry is not None else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def _token_text(token: int, entry: dict[int, Logprob] | None, decode: Callable[[list[int]], str] | None) -> str:
    if entry is not None:
        return entry[token].decoded_token or ""
    return decode([token]) if decode is not None else ""


def _raise_failed(out: RequestOutput) -> None:
    """A request that a failure of its own ended is a 500 (the engine and the others go on)."""
    if out.error is not None:
        raise OpenAIError(500, f"the request failed: {out.error}", kind="server_error", code="request_failed")


def _chat_logprob(token: int, entry: dict[int, Logprob], top: int) -> dict[str, Any]:
    def one(e: Logprob) -> dict[str, Any]:
        text = e.decoded_token or ""
        return {"token": text, "logprob": e.logprob, "bytes": list(text.encode())}

    return {**one(entry[token]), "top_logprobs": [one(e) for e in _ranked(entry, top)]}


def _ranked(entry: dict[int, Logprob], top: int) -> list[Logprob]:
    """The step's `top` most likely tokens, most likely first (the entry also holds the chosen one)."""
    return sorted((e for e in entry.values() if e.rank is not None and e.rank <= top), key=lambda e: e.rank)


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    completion = sum(len(c.token_ids) for out in outputs for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


def error_response(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error body) for what a request raised."""
    if isinstance(exc, OpenAIError):
        return exc.status, exc.body()
    if isinstance(exc, EngineDeadError):
        return 503, OpenAIError(503, str(exc), kind="server_error", code="engine_dead").body()
    if isinstance(exc, EngineAsleepError):
        return 503, OpenAIError(503, str(exc), kind="server_error", code="engine_asleep").body()
    return 500, OpenAIError(500, f"{type(exc).__name__}: {exc}", kind="server_error").body()
