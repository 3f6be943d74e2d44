"""The HTTP API's request and response bodies: OpenAI's shapes, plus the native /generate ones and vLLM's
/tokenize and /detokenize ones (pydantic).

Every field of OpenAI's chat and text completion requests is declared here, so none is dropped unseen:
it either works, is accepted as a no-op because it cannot change the output (`user`, `metadata`, ...), or
carries a `Refused` mark: any value but the ones that ask for nothing (null, [], "none") is answered with a
400 naming the field (check_fields). Names that are no field of OpenAI's, nor one of the vLLM/SGLang extras
declared here (top_k, guided_regex, structured_outputs, ...), are ignored, as vLLM ignores them, with one
warning per name per process. Ranges that the engine's SamplingParams checks itself (temperature, top_p,
penalties, logit_bias values, ...) are left to it, so each range is written once; the models bound only
what the API owns (n, logprobs counts) and what must survive the trip to the engine (integers fit in
int64, strings encode as UTF-8). vLLM's /tokenize fields follow the same policy: what would render a chat
otherwise than a chat completion does (add_generation_prompt false, a chat_template) is refused by name.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    Tag,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.fields import FieldInfo

from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.engine.tokenize import ChatPrompt
from minisgl_cli.errors import InvalidParameter
from minisgl_cli.server.chat_output import required_schema

log = logging.getLogger(__name__)


def _encodable(text: str) -> str:
    # JSON's \ud800-style escapes decode to lone surrogates, which no tokenizer or msgpack can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate escape)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
JsonSchema = dict[str, Any] | Text  # a schema, or (vLLM's and SGLang's other spelling) its JSON text


# ---- the field policy


@dataclass(frozen=True)
class Refused:
    """Marks a field this server does not implement (as `Annotated[Any, Refused(...)]`): a value other than
    `allowed`, the ones that ask for nothing, is a 400 naming the field instead of being ignored."""

    why: str
    allowed: tuple[Any, ...] = (None,)


def refusal(info: FieldInfo) -> Refused | None:
    return next((m for m in info.metadata if isinstance(m, Refused)), None)


_LEGACY_FUNCTIONS = Refused("OpenAI's deprecated functions API is not implemented: use 'tools'", (None, []))
_LEGACY_FUNCTION_CALL = Refused(
    "OpenAI's deprecated functions API is not implemented: use 'tool_choice'", (None, "none")
)
_warned: set[str] = set()  # unknown field names already logged by this process
_MAX_WARNED = 256  # then no more: a client making up names must not grow the set (or the log) forever


class Lenient(BaseModel):
    """A request object: fields it does not declare are kept aside (model_extra) for check_fields to name."""

    model_config = ConfigDict(extra="allow")


def check_fields(body: BaseModel, path: str = "") -> None:
    """InvalidParameter for the first refused value in `body` (nested objects too); a warning, once per name,
    for each undeclared field, which is ignored."""
    for name, info in type(body).model_fields.items():
        value = getattr(body, name)
        where = f"{path}.{info.alias or name}" if path else info.alias or name
        mark = refusal(info)
        if mark is not None and not any(_same(value, ok) for ok in mark.allowed):
            accepted = ", ".join(json.dumps(ok) for ok in mark.allowed)
            raise InvalidParameter(f"'{where}' is not supported: {mark.why} (accepted: {accepted})", where)
        for child, child_path in _objects(value, where):
            check_fields(child, child_path)
    for name in body.model_extra or {}:
        where = f"{path}.{name}" if path else name
        key = re.sub(r"\[\d+\]", "[]", where)  # every message's unknown field is one name
        if key not in _warned and len(_warned) < _MAX_WARNED:
            _warned.add(key)
            log.warning("ignoring the request field '%s': this server does not know it (logged once)", key)


def _same(value: Any, allowed: Any) -> bool:
    # 0 == False and 1 == True in Python, but `"store": 0` is no JSON false.
    return type(value) is type(allowed) and value == allowed


def _objects(value: Any, path: str) -> Iterator[tuple[BaseModel, str]]:
    if isinstance(value, BaseModel):
        yield value, path
    elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
        # A validated list holds one kind of item: one of a million token ids is not looked at each.
        yield from ((v, f"{path}[{i}]") for i, v in enumerate(value) if isinstance(v, BaseModel))


def one_constraint(found: list[StructuredOutput]) -> StructuredOutput | None:
    """The request's output constraint, or None; InvalidParameter naming two when it sets more than one."""
    if len(found) > 1:
        first, second = found[0].param, found[1].param
        raise InvalidParameter(
            f"a request takes at most one output constraint, and this one sets both '{first}' and '{second}'",
            param=second,
        )
    return found[0] if found else None


# ---- requests


class StreamOptions(Lenient):
    include_usage: bool | None = False
    include_obfuscation: bool | None = None  # no-op: chunks carry no obfuscation padding


class SamplingFields(Lenient):
    """Sampling settings every generation endpoint takes; None: the server's default."""

    # Parameter paths name fields under this prefix (the native endpoint nests them in sampling_params).
    param_prefix: ClassVar[str] = ""

    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False
    # OpenAI's {"token id": bias}; Strict: a JSON true or "5" is no bias.
    logit_bias: dict[str, Annotated[float, Strict()]] | None = None
    regex: Text | None = None  # SGLang's
    ebnf: Text | None = None  # SGLang's: an EBNF grammar with a `root` rule

    @field_validator("n", "stream", "logprobs", "ignore_eos", mode="before", check_fields=False)
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's schema lets these be null, which means what leaving them out means.
        return cls.model_fields[info.field_name or ""].default if value is None else value

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        # Digits only: int() would also take " 5" and "+5", and {"5": 1, "+5": 2} would silently merge.
        for key in value or {}:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f'keys must be token ids written as digits (like "50256"), got {key!r}')
        return value

    @property
    def token_bias(self) -> dict[int, float]:
        return {int(token): bias for token, bias in (self.logit_bias or {}).items()}

    def constraints(self) -> list[StructuredOutput]:
        """Every output constraint the request sets, each naming the field it came from."""
        found = []
        if self.regex is not None:
            found.append(StructuredOutput("regex", self.regex, f"{self.param_prefix}regex"))
        if self.ebnf is not None:
            found.append(StructuredOutput("grammar", self.ebnf, f"{self.param_prefix}ebnf"))
        return found

    def structured(self) -> StructuredOutput | None:
        return one_constraint(self.constraints())


class JsonSchemaFormat(Lenient):
    name: str | None = None  # OpenAI requires it; here it is only a label
    description: str | None = None  # no-op: the schema alone constrains the output
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # no-op: the schema is always enforced strictly


class ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> StructuredOutput | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutput("json_object", "", "response_format")
        if self.json_schema is None:
            raise InvalidParameter(
                "'response_format' of type 'json_schema' needs a 'json_schema' object",
                param="response_format.json_schema",
            )
        if self.json_schema.schema_ is None:
            return StructuredOutput("json_object", "", "response_format")
        return StructuredOutput.json_schema(self.json_schema.schema_, param="response_format")


class StructuredOutputs(Lenient):
    """vLLM's `structured_outputs`: one constraint of these."""

    json_: JsonSchema | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None  # EBNF with a `root` rule
    json_object: bool | None = None
    structural_tag: Annotated[Any, Refused("structural tags are not implemented")] = None

    def constraints(self) -> list[StructuredOutput]:
        found = []
        if self.json_ is not None:
            found.append(StructuredOutput.json_schema(self.json_, param="structured_outputs.json"))
        if self.regex is not None:
            found.append(StructuredOutput("regex", self.regex, "structured_outputs.regex"))
        if self.choice is not None:
            found.append(StructuredOutput.choice(self.choice, param="structured_outputs.choice"))
        if self.grammar is not None:
            found.append(StructuredOutput("grammar", self.grammar, "structured_outputs.grammar"))
        if self.json_object:
            found.append(StructuredOutput("json_object", "", "structured_outputs.json_object"))
        return found


class OpenAIRequest(SamplingFields):
    """What chat and text completions share."""

    model: str | None = None  # None: the served model
    max_tokens: Int64 | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # no-op: an end-user label for OpenAI's abuse monitoring
    # Output constraints (besides SGLang's regex and ebnf): OpenAI's, vLLM's and vLLM's older names.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and bool(self.stream_options.include_usage)

    def constraints(self) -> list[StructuredOutput]:
        found = []
        if self.response_format is not None and (fmt := self.response_format.structured()) is not None:
            found.append(fmt)
        if self.structured_outputs is not None:
            found += self.structured_outputs.constraints()
        if self.guided_json is not None:
            found.append(StructuredOutput.json_schema(self.guided_json, param="guided_json"))
        if self.guided_regex is not None:
            found.append(StructuredOutput("regex", self.guided_regex, "guided_regex"))
        if self.guided_choice is not None:
            found.append(StructuredOutput.choice(self.guided_choice, param="guided_choice"))
        if self.guided_grammar is not None:
            found.append(StructuredOutput("grammar", self.guided_grammar, "guided_grammar"))
        return found + super().constraints()


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCallIn(Lenient):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it back


class ToolCallIn(Lenient):
    """A tool call of an earlier assistant turn, sent back with the history."""

    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn

    def to_prompt(self) -> dict[str, Any]:
        # Chat templates (Qwen's, Llama's) render the arguments with tojson: they want the object, not its text.
        try:
            arguments: Any = json.loads(self.function.arguments)
        except json.JSONDecodeError:
            arguments = self.function.arguments
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        return call | ({"id": self.id} if self.id is not None else {})


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # passed to the chat template, which may show it or not
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn's calls
    tool_call_id: Text | None = None  # a tool turn: the call it answers
    function_call: Annotated[Any, _LEGACY_FUNCTION_CALL] = None
    audio: Annotated[Any, Refused("audio is not implemented")] = None
    refusal: Annotated[Any, Refused("send the refusal's text as 'content'")] = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        """Parts become one string here, so a non-text part gets one clear error instead of a union's two."""
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"only text content parts ({{'type': 'text', 'text': ...}}) are supported, got {kind!r}"
                )
            texts.append(part["text"])  # its other keys (OpenAI's prompt_cache_breakpoint) are cache hints
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        # Only an assistant turn may come without content (OpenAI's, when it carried tool calls instead).
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs a 'content' field")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only an assistant message has 'tool_calls', not a {self.role} one")
        return self

    def to_prompt(self) -> dict[str, Any]:
        """The message as the engine's chat template takes it."""
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        prompt: dict[str, Any] = {
            "role": role,
            "content": self.content if isinstance(self.content, str) else "",
        }
        if self.name is not None:
            prompt["name"] = self.name
        if self.tool_calls:
            prompt["tool_calls"] = [call.to_prompt() for call in self.tool_calls]
        if self.tool_call_id is not None:
            prompt["tool_call_id"] = self.tool_call_id
        return prompt


_TOOL_NAME = r"^[A-Za-z0-9_.\-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(Lenient):
    name: Annotated[str, Field(pattern=_TOOL_NAME)]
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None  # no-op: a call the server constrains always follows the schema

    @property
    def arguments_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(Lenient):
    type: Literal["function"]
    function: FunctionDef

    def to_prompt(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": self.function.model_dump(exclude_none=True, exclude={"strict"}),
        }


class NamedFunction(Lenient):
    name: str


class NamedToolChoice(Lenient):
    type: Literal["function"]
    function: NamedFunction


_NOT_YET = "it would change the output and is not implemented"


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # No-ops: labels and hints for OpenAI's own service (the radix cache reuses prefixes by itself).
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    # Refused unless they ask for nothing (or for what this server does anyway: one tier, text, no storing).
    service_tier: Annotated[Any, Refused("this server has one tier", (None, "auto", "default"))] = None
    store: Annotated[Any, Refused("this server stores no completions", (None, False))] = None
    modalities: Annotated[Any, Refused("the only output is text", (None, ["text"]))] = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: Annotated[bool, Strict()] | None = None  # None: true, as OpenAI's default
    functions: Annotated[Any, _LEGACY_FUNCTIONS] = None
    function_call: Annotated[Any, _LEGACY_FUNCTION_CALL] = None
    chat_template_kwargs: dict[str, Any] | None = (
        None  # vLLM's: extra chat template variables (enable_thinking)
    )

    def tool_rules(self) -> tuple[str, str | None]:
        """(tool mode, the named tool): "none", "auto", "named" or "required" (chat_output.py); InvalidParameter
        for a choice the tools cannot meet."""
        tools = self.tools or []
        names = [t.function.name for t in tools]
        if len(set(names)) < len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise InvalidParameter(f"two tools are named '{dup}': tool names must be unique", param="tools")
        for i, tool in enumerate(tools):
            param = f"tools[{i}].function.parameters"
            StructuredOutput.json_schema(tool.function.arguments_schema, param=param).check()
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                known = ", ".join(names) or "none"
                message = f"tool_choice names the function '{choice.function.name}', which is not in 'tools' ({known})"
                raise InvalidParameter(message, param="tool_choice")
            return "named", choice.function.name
        if choice in ("auto", "required") and not tools:
            raise InvalidParameter(f"tool_choice '{choice}' needs 'tools'", param="tool_choice")
        return choice, None

    def tool_definitions(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template takes them; none when tool_choice is "none" (the model is not
        offered tools it may not call)."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.to_prompt() for t in self.tools]

    def constraints(self) -> list[StructuredOutput]:
        """Besides the output constraints, tool_choice "required" or a named tool: the call's grammar."""
        found = super().constraints()
        mode, name = self.tool_rules()
        schemas = {t.function.name: t.function.arguments_schema for t in self.tools or []}
        if mode == "named":
            found.append(StructuredOutput.json_schema(schemas[name or ""], param="tool_choice"))
        elif mode == "required":
            parallel = self.parallel_tool_calls is not False
            schema = required_schema(list(schemas.items()), parallel)
            found.append(StructuredOutput.json_schema(schema, param="tool_choice"))
        return found

    audio: Annotated[Any, Refused("audio output is not implemented")] = None
    prediction: Annotated[Any, Refused(_NOT_YET)] = None
    reasoning_effort: Annotated[Any, Refused(_NOT_YET)] = None
    verbosity: Annotated[Any, Refused(_NOT_YET)] = None
    web_search_options: Annotated[Any, Refused("this server has no web search")] = None
    moderation: Annotated[Any, Refused("this server runs no moderation")] = None


TokenIds = Annotated[list[Int64], Field(min_length=1)]


def _prompt_kind(value: Any) -> str | None:
    # The first element decides: pydantic's smart union would instead try every member on the whole list,
    # which for a body of a million token ids costs seconds of the event loop rather than a fraction of one.
    if isinstance(value, str):
        return "str"
    if not isinstance(value, list):
        return None
    first = value[0] if value else 0  # an empty list is refused as an empty token-id prompt
    if isinstance(first, str):
        return "list[str]"
    return "list[list[int]]" if isinstance(first, list) else "list[int]"


# The tags read like pydantic's own union labels, which error paths skip (they are no field names).
PromptField = Annotated[
    Annotated[Text, Tag("str")]
    | Annotated[list[Text], Tag("list[str]")]
    | Annotated[TokenIds, Tag("list[int]")]
    | Annotated[list[TokenIds], Tag("list[list[int]]")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message=(
            "a prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        ),
    ),
]


class CompletionRequest(OpenAIRequest):
    # One prompt (text or token ids) or a batch of them.
    prompt: PromptField
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Annotated[Any, Refused("the prompt is not echoed", (None, False))] = False
    suffix: Annotated[Any, Refused("inserting text before a suffix is not implemented", (None, ""))] = None
    best_of: int | None = None  # only equal to n (api.py): there is no ranking of more candidates

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("a prompt (and each prompt of a batch) must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class NativeSamplingParams(SamplingFields):
    param_prefix: ClassVar[str] = "sampling_params."

    max_new_tokens: Int64 | None = None
    json_schema: JsonSchema | None = None  # SGLang's (there a JSON string)

    def constraints(self) -> list[StructuredOutput]:
        found = []
        if self.json_schema is not None:
            found.append(
                StructuredOutput.json_schema(self.json_schema, param=f"{self.param_prefix}json_schema")
            )
        return found + super().constraints()


class NativeGenerateRequest(Lenient):
    """POST /generate: exactly one of `text` and `input_ids`."""

    text: Text | None = None
    input_ids: TokenIds | None = None
    sampling_params: NativeSamplingParams = Field(default_factory=NativeSamplingParams)
    stream: bool = False

    @model_validator(mode="after")
    def _one_prompt(self) -> NativeGenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of 'text' and 'input_ids'")
        return self

    @property
    def prompt(self) -> str | list[int]:
        return self.text if self.text is not None else list(self.input_ids or [])


_ONE_RENDERING = "a chat is rendered as a chat completion renders it: the model's template, generation prompt"


class TokenizeRequest(Lenient):
    """POST /tokenize (vLLM's shape): exactly one of a text `prompt` and chat `messages`."""

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = None  # offered to the chat template, as a chat completion offers them
    chat_template_kwargs: dict[str, Any] | None = None
    # None: true for a prompt (BOS, as generation adds it), false for messages (their template writes it).
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False
    add_generation_prompt: Annotated[Any, Refused(_ONE_RENDERING, (None, True))] = None
    continue_final_message: Annotated[Any, Refused(_ONE_RENDERING, (None, False))] = None
    chat_template: Annotated[Any, Refused(_ONE_RENDERING)] = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' and 'messages'")
        if self.messages is None and (self.tools is not None or self.chat_template_kwargs is not None):
            raise ValueError("'tools' and 'chat_template_kwargs' go with 'messages', not with 'prompt'")
        return self

    @property
    def special_tokens(self) -> bool:
        """add_special_tokens, as the kind of input takes it; InvalidParameter for true with messages."""
        if self.messages is None:
            return self.add_special_tokens is not False
        if self.add_special_tokens:
            raise InvalidParameter(
                "'add_special_tokens' must be false with 'messages': the chat template writes the special "
                "tokens itself, as it does for a chat completion",
                "add_special_tokens",
            )
        return False

    def to_prompt(self) -> str | ChatPrompt:
        if self.messages is None:
            return self.prompt or ""
        tools = [t.to_prompt() for t in self.tools] if self.tools else None
        return ChatPrompt([m.to_prompt() for m in self.messages], tools, self.chat_template_kwargs or {})


class DetokenizeRequest(Lenient):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[Int64]


# ---- responses


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = (
        None  # the model's thinking (--reasoning-parser), as vLLM and SGLang name it
    )
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_extras(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI leaves out what a message does not have; content stays, as null when there are only calls.
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k == "content"}


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    # {"role": "assistant", "content": ""} first, then {"content": ...}, then {} with the finish reason.
    delta: dict[str, Any]  # also {"reasoning_content": ...} and {"tool_calls": [...]} (server/chat_output.py)
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # sent (as null until the last chunk) only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # where each token starts in the choice's text


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A text completion, and each chunk of a streamed one (OpenAI uses the same object for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minisgl"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class NativeMetaInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: str | None


class NativeGenerateResponse(BaseModel):
    """/generate's answer, and each streamed delta (text and ids of that step only)."""

    text: str
    output_ids: list[int]
    meta_info: NativeMetaInfo


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int  # the context length, as /v1/models reports it
    tokens: list[int]
    token_strs: list[str] | None = None  # each token as the vocabulary spells it, with return_token_strs


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
