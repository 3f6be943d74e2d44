"""Structured outputs and logit_bias in the engine (engine/structured.py, grammar.py, logit_bias.py, scheduler.py).

References: jsonschema's validator and Python's `re.fullmatch` for what the text must be; the same engine with
overlap off for the overlap path (equal tokens, not similar ones); an unconstrained request run alone for the
claim that a constrained neighbour in the batch leaves its row untouched.

A tiny random model (its byte-level BPE tokenizer of ~300 tokens) makes masks do real work: left alone it writes
noise, so any valid output is the grammar's doing. The embedded SmolLM2 checks the same on a real vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from model_helpers import GPU_SHAPE, make_tiny_model
from test_overlap import generate_both

from minisgl_cli.engine import grammar
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.engine.structured import StructuredOutput
from minisgl_cli.errors import InvalidParameter

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "main": {"type": "boolean"}},
            "required": ["zip", "main"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
EBNF = 'root ::= "SELECT " column (", " column)* " FROM t;"\ncolumn ::= "a" | "b" | "c"'


def _constraints() -> list[StructuredOutput]:
    """Constraints whose every output is short: a random model ends them well inside 200 tokens. (Any JSON
    object has unbounded strings, which such a model rarely closes: SmolLM2 checks json_object.)"""
    return [
        StructuredOutput.json_schema(PERSON),
        StructuredOutput("regex", PHONE),
        StructuredOutput.choice(["alpha", "beta", "gamma delta"]),
        StructuredOutput("grammar", EBNF),
    ]


def _check(text: str, structured: StructuredOutput) -> None:
    """`text` matches `structured` (the whole text, not a prefix of it)."""
    if structured.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(structured.spec))
    elif structured.kind == "json_object":
        assert isinstance(json.loads(text), dict), text
    elif structured.kind == "regex":
        assert re.fullmatch(structured.spec, text), text
    elif structured.kind == "choice":
        assert text in json.loads(structured.spec), text
    else:
        assert re.fullmatch(r"SELECT [abc](, [abc])* FROM t;", text), text


# ---- the constraint itself: checked when the request is made


@pytest.mark.parametrize(
    ("structured", "message"),
    [
        (StructuredOutput.json_schema({"type": "nonsense"}), 'invalid JSON schema in response_format: Unsupported type "nonsense"'),
        (StructuredOutput("json_schema", "{not json"), "is not JSON"),
        (StructuredOutput("json_schema", "[1, 2]"), "must be an object"),
        (StructuredOutput("regex", "a(b", param="guided_regex"), "invalid regex in guided_regex: .*parenthesis"),
        (StructuredOutput("grammar", "root ::= ", param="ebnf"), "invalid EBNF grammar in ebnf: EBNF parser error"),
        (StructuredOutput.choice([]), "non-empty list"),
        (StructuredOutput.choice(["a", ""]), "non-empty list"),
    ],
)  # fmt: skip
def test_an_invalid_constraint_is_refused_when_the_request_is_made(
    structured: StructuredOutput, message: str
) -> None:
    with pytest.raises(InvalidParameter, match=message) as err:
        SamplingParams(structured=structured)
    assert err.value.param == structured.param
    # The message is the user's: no C++ file name or time stamp from xgrammar.
    assert ".cc:" not in str(err.value)


def test_unknown_kinds_and_bad_logit_bias_are_refused() -> None:
    with pytest.raises(InvalidParameter, match="unknown structured output kind 'xml'"):
        StructuredOutput("xml", "")
    with pytest.raises(InvalidParameter, match=r"in \[-100, 100\]") as err:
        SamplingParams(logit_bias={3: 101.0})
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidParameter, match="token ids"):
        SamplingParams(logit_bias={-1: 1.0})


# ---- a tiny random model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # GPU_SHAPE with a head_dim FlashInfer's prebuilt kernels cover: on a GPU these tests run there (bf16 logits
    # through xgrammar's CUDA mask kernel, overlap scheduling for real).
    return make_tiny_model(tmp_path_factory.mktemp("structured"), "llama", seed=11, **GPU_SHAPE, head_dim=64)


@pytest.fixture(scope="module")
def tiny_llm(tiny: Path) -> LLM:
    return LLM(str(tiny), kv_cache_tokens=4096, max_running_requests=16)


def _workload() -> tuple[list[str], list[SamplingParams]]:
    """Every kind of constraint at two temperatures and seeds, beside unconstrained requests."""
    prompts, params = [], []
    for i, structured in enumerate(_constraints()):
        for temperature, seed in ((0.0, 0), (1.0, 7 + i)):
            prompts.append(f"request {i} at {temperature}")
            params.append(
                SamplingParams(temperature=temperature, seed=seed, max_tokens=200, structured=structured)
            )
    for i in range(3):
        prompts.append(f"free text {i}")
        params.append(SamplingParams(temperature=0.8, seed=i, max_tokens=12, ignore_eos=True))
    return prompts, params


def test_every_constrained_output_matches_and_overlap_gives_the_same_tokens(tiny_llm: LLM) -> None:
    prompts, params = _workload()
    plain, over = generate_both(tiny_llm, prompts, params)
    for a, b, sp in zip(plain, over, params, strict=True):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        if sp.structured is not None:
            # Every constrained request ended by finishing its grammar, well inside its budget.
            assert a.finish_reason == "stop", (sp.structured.kind, a.text)
            _check(a.text, sp.structured)


def test_a_constrained_neighbour_leaves_the_other_rows_alone(tiny_llm: LLM) -> None:
    prompts, params = _workload()
    together = tiny_llm.generate(prompts, params)
    free = [i for i, sp in enumerate(params) if sp.structured is None]
    alone = tiny_llm.generate([prompts[i] for i in free], [params[i] for i in free])
    assert [together[i].token_ids for i in free] == [o.token_ids for o in alone]


def test_preemption_and_chunked_prefill_keep_the_matcher_in_step(tiny: Path) -> None:
    """A pool too small for the batch: constrained requests are preempted and recomputed, and their matchers,
    which keep every accepted token, continue where they stopped, with overlap on and off."""
    llm = LLM(str(tiny), kv_cache_tokens=150, max_running_requests=6, max_prefill_tokens=16, page_size=1)
    structured = StructuredOutput.json_schema(PERSON)
    prompts = [f"a longer prompt for request number {i}, to fill the pool" for i in range(6)]
    params = [SamplingParams(temperature=0.9, seed=i, max_tokens=80, structured=structured) for i in range(6)]
    plain, over = generate_both(llm, prompts, params)
    assert [o.token_ids for o in plain] == [o.token_ids for o in over]
    assert llm.scheduler.stats().num_preemptions > 0
    for out in plain:
        if out.finish_reason == "stop":
            _check(out.text, structured)
        else:  # out of tokens first: a prefix of a valid object, never anything else
            assert out.finish_reason == "length" and out.text.startswith("{")


def test_n_requests_share_one_compiled_grammar(tiny_llm: LLM) -> None:
    structured = StructuredOutput("regex", PHONE)
    backend = tiny_llm.scheduler.grammars
    assert backend is not None
    first = backend.compile(structured)
    assert backend.compile(StructuredOutput("regex", PHONE, param="other")) is first  # cached by constraint
    outs = tiny_llm.generate(
        ["x"] * 4, [SamplingParams(temperature=1.0, seed=s, structured=structured) for s in range(4)]
    )
    for out in outs:
        _check(out.text, structured)


def test_a_grammar_that_fails_to_compile_aborts_only_its_request(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = LLM(str(tiny), kv_cache_tokens=1024)

    def fail(self: grammar.GrammarBackend, structured: StructuredOutput) -> None:
        raise RuntimeError("out of memory while compiling")

    monkeypatch.setattr(grammar.GrammarBackend, "_compile", fail)
    outs = llm.generate(
        ["a", "b"],
        [
            SamplingParams(max_tokens=5, structured=StructuredOutput("regex", "[ab]+")),
            SamplingParams(max_tokens=5),
        ],
    )
    assert outs[0].finish_reason == "abort" and outs[0].token_ids == []
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5
    assert not llm.scheduler.has_work


def test_finishing_a_request_while_its_grammar_compiles(tiny_llm: LLM) -> None:
    sched = tiny_llm.scheduler
    req = sched.add([5, 6, 7], SamplingParams(structured=StructuredOutput.json_schema({"type": "array"})))
    assert req in sched.compiling
    sched.finish(req, "abort")
    assert req not in sched.compiling and not sched.has_work


def test_logit_bias_bans_and_forces_tokens(tiny_llm: LLM) -> None:
    prompt = [[9, 8, 7, 6]]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = tiny_llm.generate(prompt, greedy)[0].token_ids
    banned = tiny_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                      logit_bias={base[0]: -100.0}))[0].token_ids  # fmt: skip
    assert base[0] not in banned
    forced = tiny_llm.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True,
                                                      logit_bias={42: 100.0}))[0].token_ids  # fmt: skip
    assert forced == [42] * 6
    # Only the biased request's row: its neighbour keeps its greedy tokens.
    both = tiny_llm.generate(prompt * 2, [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                        logit_bias={42: 100.0}), greedy])  # fmt: skip
    assert both[0].token_ids == [42] * 6 and both[1].token_ids == base


def test_logit_bias_outside_the_vocabulary_is_a_clear_error(tiny_llm: LLM) -> None:
    vocab = tiny_llm.runner.model_config.vocab_size
    with pytest.raises(InvalidParameter, match=f"outside the model's vocabulary of {vocab} tokens") as err:
        tiny_llm.generate(["a"], SamplingParams(logit_bias={vocab: 1.0}))
    assert err.value.param == "logit_bias"
    assert not tiny_llm.scheduler.has_work


# ---- the embedded SmolLM2: a real vocabulary


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> LLM:
    return LLM(str(smollm2_dir))


def test_smollm2_json_schema_at_several_seeds_and_temperatures(smol: LLM) -> None:
    messages = [{"role": "user", "content": "Describe a person as a JSON object."}]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=150, structured=structured)
              for t, s in ((0.0, 0), (0.7, 1), (1.0, 2), (1.3, 3))
              for structured in (StructuredOutput.json_schema(PERSON), StructuredOutput("json_object"))]  # fmt: skip
    params.append(SamplingParams(temperature=0, max_tokens=16))
    outs = smol.generate([messages] * len(params), params)
    for out, sp in zip(outs, params, strict=True):
        if sp.structured is None:
            continue
        if sp.structured.kind == "json_schema" or out.finish_reason == "stop":
            assert out.finish_reason == "stop", out.text
            _check(out.text, sp.structured)
        else:  # any object may go on for longer than the budget (a list the model keeps extending)
            assert out.finish_reason == "length" and out.text.startswith("{"), out.text
    assert sum(o.finish_reason == "stop" for o, sp in zip(outs, params, strict=True) if sp.structured) >= 6
    assert outs[-1].text == smol.generate([messages], params[-1])[0].text
