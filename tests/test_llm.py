"""The LLM API end to end: greedy tokens against transformers' generate(), and the scheduler's batching,
chunking and preemption against the plain unbatched run; sampling seeds, stops, streaming, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from model_helpers import make_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from minisgl_cli.config import EngineConfig
from minisgl_cli.engine.llm import LLM
from minisgl_cli.engine.request import SamplingParams
from minisgl_cli.errors import MinisglError, UsageError

# Token-id prompts of mixed lengths for the tiny models (vocab 384).
TINY_PROMPTS = [[5, 17, 42, 99, 7], [120, 3, 250], [61] * 11 + [300, 12, 8], [200, 201, 202, 203, 9, 9, 44]]
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a linked list is in two sentences.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a short tip for learning to code.",
    "What is 12 times 7?",
]


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)  # type: ignore[arg-type]


def hf_generate(model: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate() of one prompt, stopping at the model's eos like ours."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: make_tiny_model(root, arch, seed=i) for i, arch in enumerate(("llama", "qwen2", "qwen3"))}


@pytest.fixture(scope="module")
def tiny_llm(tiny: dict[str, Path]) -> LLM:
    return LLM(str(tiny["llama"]), kv_cache_tokens=4096, max_running_requests=8)


@pytest.mark.parametrize(("arch", "page_size"), [("llama", 1), ("qwen2", 1), ("qwen3", 1), ("llama", 4)])
def test_tiny_greedy_equals_transformers(tiny: dict[str, Path], arch: str, page_size: int) -> None:
    llm = LLM(str(tiny[arch]), kv_cache_tokens=2048, max_running_requests=8, page_size=page_size)
    ref = AutoModelForCausalLM.from_pretrained(tiny[arch], dtype=torch.float32)
    outs = llm.generate(TINY_PROMPTS, greedy(24))  # one batch of mixed lengths
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        want = hf_generate(ref, prompt, 24)
        assert out.token_ids == want
        assert out.finish_reason == ("stop" if want[-1] == 2 else "length")
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(want)
    # Each request alone gives what it gave in the batch.
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        assert llm.generate(prompt, greedy(24))[0].token_ids == out.token_ids


def test_text_and_chat_prompts_use_the_tokenizer(tiny: dict[str, Path], tiny_llm: LLM) -> None:
    tok = AutoTokenizer.from_pretrained(tiny["llama"])
    chat = [{"role": "user", "content": "Hello there!"}]
    chat_ids = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    cases = [
        ("Once upon a time", tok.encode("Once upon a time")),
        (chat, tok.encode(chat_ids, add_special_tokens=False)),
    ]
    for prompt, ids in cases:
        by_text = tiny_llm.generate(prompt, greedy(12, ignore_eos=True))[0]
        by_ids = tiny_llm.generate(ids, greedy(12, ignore_eos=True))[0]
        assert by_text.token_ids == by_ids.token_ids and by_text.usage.prompt_tokens == len(ids)
        assert by_text.text == tok.decode(by_text.token_ids, skip_special_tokens=True)
    assert chat_ids.startswith("<|im_start|>user\nHello there!") and chat_ids.endswith(
        "<|im_start|>assistant\n"
    )


def test_chunked_prefill_and_preemption_equal_the_plain_run(tiny: dict[str, Path], tiny_llm: LLM) -> None:
    prompts = [[(7 * i + j) % 380 + 3 for j in range(n)] for i, n in enumerate([40, 9, 33, 21, 50, 4])]
    params = [greedy(20 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    plain = tiny_llm.generate(prompts, params)
    assert tiny_llm.scheduler.stats().num_preemptions == 0

    chunked = LLM(str(tiny["llama"]), kv_cache_tokens=4096, max_running_requests=8, max_prefill_tokens=16)
    assert [o.token_ids for o in chunked.generate(prompts, params)] == [o.token_ids for o in plain]

    for page_size in (1, 4):
        # 64 slots for 6 requests of up to 85 tokens: decode keeps running out of pages.
        small = LLM(str(tiny["llama"]), kv_cache_tokens=96, max_running_requests=4, page_size=page_size)
        outs = small.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        assert all(o.finish_reason == "length" for o in outs)
        stats = small.scheduler.stats()
        assert stats.num_preemptions > 0 and stats.pages_used == 0 and not small.scheduler.has_work


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_llm: LLM) -> None:
    def sampled(seed: int | None, n: int = 16) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=0.95, seed=seed, max_tokens=n, ignore_eos=True)

    alone = tiny_llm.generate(TINY_PROMPTS[0], sampled(7))[0].token_ids
    # Same seed, another position in another batch: the same tokens.
    batch = tiny_llm.generate(
        [TINY_PROMPTS[1], TINY_PROMPTS[0], TINY_PROMPTS[2]], [sampled(1), sampled(7), greedy(5)]
    )
    assert batch[1].token_ids == alone
    others = {tuple(tiny_llm.generate(TINY_PROMPTS[0], sampled(s))[0].token_ids) for s in (8, 9, 10)}
    assert tuple(alone) not in others and len(others) == 3


def test_penalties_follow_the_formulas_across_preemption(tiny: dict[str, Path]) -> None:
    """Greedy with repetition, frequency and presence penalties against a reference loop that applies
    them by hand to transformers' logits; run in a pool small enough to preempt, which must not lose
    the token counts."""
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=24,
        ignore_eos=True,
        repetition_penalty=1.6,
        frequency_penalty=0.7,
        presence_penalty=0.4,
    )
    ref = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)

    def reference(prompt: list[int]) -> list[int]:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                x = ref(torch.tensor([seq])).logits[0, -1].double()
                seen = torch.tensor(sorted(set(seq)))
                x[seen] = torch.where(x[seen] > 0, x[seen] / 1.6, x[seen] * 1.6)
                counts = torch.bincount(
                    torch.tensor(seq[len(prompt) :], dtype=torch.long), minlength=x.numel()
                )
                x -= 0.7 * counts + 0.4 * (counts > 0)
                seq.append(int(x.argmax()))
        return seq[len(prompt) :]

    small = LLM(str(tiny["llama"]), kv_cache_tokens=40, max_running_requests=4)
    outs = small.generate(TINY_PROMPTS, sp)
    assert small.scheduler.stats().num_preemptions >= 3
    for prompt, out in zip(TINY_PROMPTS, outs, strict=True):
        assert out.token_ids == reference(prompt)


def test_ignore_eos_and_max_tokens_give_exact_lengths(tiny_llm: LLM) -> None:
    outs = tiny_llm.generate(TINY_PROMPTS, [greedy(n, ignore_eos=True) for n in (1, 7, 30, 64)])
    assert [len(o.token_ids) for o in outs] == [1, 7, 30, 64]
    assert all(o.finish_reason == "length" for o in outs)


def test_stop_token_ids_and_iter_outputs_order(tiny_llm: LLM) -> None:
    full = tiny_llm.generate(TINY_PROMPTS[0], greedy(20, ignore_eos=True))[0].token_ids
    stop_at = full[5]
    cut = tiny_llm.generate(TINY_PROMPTS[0], greedy(20, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    assert cut.token_ids == full[: full.index(stop_at) + 1] and cut.finish_reason == "stop"
    # Completion order: the shortest max_tokens finishes first; index says which prompt it was.
    order = [
        o.index
        for o in tiny_llm.iter_outputs(TINY_PROMPTS, [greedy(n, ignore_eos=True) for n in (9, 3, 6, 1)])
    ]
    assert order == [3, 1, 2, 0]


def test_logprobs_equal_transformers_log_softmax(tiny: dict[str, Path], tiny_llm: LLM) -> None:
    prompt = TINY_PROMPTS[2]
    out = tiny_llm.generate(prompt, greedy(6, ignore_eos=True, logprobs=3))[0]
    ref = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    with torch.no_grad():
        logp = ref(torch.tensor([prompt + out.token_ids])).logits[0].double().log_softmax(-1)
    assert out.logprobs is not None and len(out.logprobs) == 6
    for i, lp in enumerate(out.logprobs):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        top = row.topk(3)
        assert [t for t, _ in lp.top_logprobs] == top.indices.tolist()
        assert [v for _, v in lp.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_bad_input_raises_before_any_work(tiny: dict[str, Path], tiny_llm: LLM) -> None:
    with pytest.raises(UsageError, match="unknown engine setting 'page_sise'"):
        LLM(str(tiny["llama"]), page_sise=4)
    with pytest.raises(UsageError, match="context length is 512"):
        tiny_llm.generate([[5, 6], [7] * 512], greedy(4))
    with pytest.raises(UsageError, match="out of range"):
        tiny_llm.generate([[5, 6], [384]], greedy(4))
    with pytest.raises(UsageError, match="2 sampling parameter sets for 3 prompts"):
        tiny_llm.generate(TINY_PROMPTS[:3], [greedy(1), greedy(1)])
    with pytest.raises(UsageError, match="empty"):
        tiny_llm.generate("", greedy(1))
    assert not tiny_llm.scheduler.has_work  # the valid prompts of a rejected call were not queued
    # Clipped to the context: 512 - 500 tokens left.
    out = tiny_llm.generate([[9] * 500], greedy(100, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_no_tokenizer_token_ids_only(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path, "qwen3", with_tokenizer=False)
    llm = LLM.from_config(EngineConfig(model=str(path), kv_cache_tokens=512, max_running_requests=2))
    assert llm.tokenizer is None
    out = llm.generate([1, 2, 3], greedy(5, ignore_eos=True))[0]
    assert out.text == "" and len(out.token_ids) == 5
    with pytest.raises(UsageError, match="need a tokenizer"):
        llm.generate("hello", greedy(5))
    with pytest.raises(UsageError, match="need a tokenizer"):
        llm.generate([{"role": "user", "content": "hi"}], greedy(5))
    with pytest.raises(UsageError, match="stop strings need a tokenizer"):
        llm.generate([1, 2, 3], greedy(5, stop=["x"]))


def test_abandoned_stream_frees_its_requests(tiny_llm: LLM) -> None:
    stream = tiny_llm.stream(TINY_PROMPTS, greedy(50, ignore_eos=True))
    next(stream)
    with pytest.raises(MinisglError, match="already running"):
        tiny_llm.generate(TINY_PROMPTS[0], greedy(2))
    stream.close()
    sched = tiny_llm.scheduler
    assert not sched.has_work and sched.stats().pages_used == 0
    assert tiny_llm.generate(TINY_PROMPTS[0], greedy(2))[0].finish_reason in ("stop", "length")


# ---- the real model: the embedded SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> LLM:
    return LLM()  # the embedded default, resolved to the same converted directory


@pytest.fixture(scope="module")
def smol_ref(smollm2_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)


def first_mismatch_is_a_near_tie(
    ref: AutoModelForCausalLM, prompt: list[int], ours: list[int], want: list[int]
) -> bool:
    """Where our greedy tokens first differ from transformers', are its two best logits within float32 noise?

    Both follow the same greedy rule, so the only legitimate difference is a near tie that rounding (a
    different summation order) breaks the other way; everything before it must be equal.
    """
    i = next((i for i, (a, b) in enumerate(zip(ours, want)) if a != b), min(len(ours), len(want)))  # noqa: B905
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + want[:i]])).logits[0, -1]
    top2 = logits.topk(2).values
    return bool(top2[0] - top2[1] < 1e-3) and {ours[i], want[i]} == set(logits.topk(2).indices.tolist())


def test_smollm2_chat_greedy_equals_transformers(smol: LLM, smol_ref: AutoModelForCausalLM) -> None:
    chats = [[{"role": "user", "content": c}] for c in CHATS]
    outs = smol.generate(chats, greedy(64))  # one batch of 8
    for chat, out in zip(chats, outs, strict=True):
        text = smol.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = smol.tokenizer.encode(text, add_special_tokens=False)
        assert out.usage.prompt_tokens == len(ids)
        want = hf_generate(smol_ref, ids, 64)
        if out.token_ids != want:
            assert first_mismatch_is_a_near_tie(smol_ref, ids, out.token_ids, want), chat[0]["content"]
        assert out.text == smol.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert out.finish_reason == ("stop" if out.token_ids[-1] == 2 else "length")
    assert "Paris" in outs[0].text


def test_smollm2_stop_strings_cut_exactly_and_stream_concatenates(smol: LLM) -> None:
    prompt = "Once upon a time, in a small village,"
    full = smol.generate(prompt, greedy(24, ignore_eos=True))[0]
    stop = full.text[40:46]
    assert len(stop) == 6 and full.text.index(stop) <= 40
    cut = smol.generate(prompt, greedy(24, ignore_eos=True, stop=["@@never@@", stop]))[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    # token_ids run up to and including the token that completed the stop string.
    tok = smol.tokenizer
    assert cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])

    prompts = [prompt, [{"role": "user", "content": "Write a haiku about the sea."}]]
    params = [greedy(16, ignore_eos=True), greedy(16, stop=["\n"])]
    texts = ["", ""]
    for index, delta in smol.stream(prompts, params):
        texts[index] += delta
    assert texts == [o.text for o in smol.generate(prompts, params)]
    assert texts[0] == full.text[: len(texts[0])] and len(texts[0]) > 40
