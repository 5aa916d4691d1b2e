"""LLM.generate takes vLLM's prompt forms (DESIGN.md's Python contract): a string, {"prompt": str},
{"prompt_token_ids": [...]}, a list of token ids, lists mixing these, and `prompt_token_ids=`; each
gives the same tokens as the plain form, and anything else is a TypeError naming the forms."""

from __future__ import annotations

import pytest

from dynserve import LLM, SamplingParams

TEXT = "def hello(name):"
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    return LLM(str(checkpoint_factory("mixtral")), num_kv_blocks=64)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_every_prompt_form_gives_the_plain_forms_tokens(llm):
    ids = llm.tokenizer.encode(TEXT)
    want = _tokens(llm.generate(TEXT, GREEDY))[0]
    assert _tokens(llm.generate({"prompt": TEXT}, GREEDY)) == [want]
    assert _tokens(llm.generate({"prompt_token_ids": ids}, GREEDY)) == [want]
    assert _tokens(llm.generate(ids, GREEDY)) == [want]  # one prompt of token ids
    assert _tokens(llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY)) == [want]
    mixed = [TEXT, {"prompt": TEXT}, {"prompt_token_ids": ids}, ids]
    outs = llm.generate(mixed, GREEDY)
    assert _tokens(outs) == [want] * 4
    assert outs[1].prompt == TEXT and outs[2].prompt_token_ids == ids


def test_an_empty_prompt_is_a_value_error(llm):
    for empty in ({"prompt_token_ids": []}, [{"prompt_token_ids": []}]):
        with pytest.raises(ValueError, match="empty"):
            llm.generate(empty, GREEDY)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompt_token_ids=[[]], sampling_params=GREEDY)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "bad",
    [
        {"text": TEXT},
        {"prompt": 5},
        {"prompt_token_ids": ["a"]},
        [1.5, 2],
        [[1, 2], {"prompt": 3}],
        42,
    ],
)
def test_other_forms_are_a_type_error_naming_the_forms(llm, bad):
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate(bad, GREEDY)
    assert not llm.engine.has_unfinished_requests()


CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
OTHER = [{"role": "user", "content": "hello"}]


def _plain_chat_tokens(llm, conv) -> list[int]:
    """The tokens generated from the conversation rendered by hand: the plain form's answer."""
    tok = llm.tokenizer
    ids = tok.encode(tok.apply_chat_template(conv, True), add_special_tokens=False)
    return _tokens(llm.generate({"prompt_token_ids": ids}, GREEDY))[0]


def test_chat_takes_one_conversation_or_a_list_of_them(llm):
    want, other = _plain_chat_tokens(llm, CONV), _plain_chat_tokens(llm, OTHER)
    assert _tokens(llm.chat(CONV, GREEDY)) == [want]
    assert _tokens(llm.chat([CONV], GREEDY)) == [want]
    assert _tokens(llm.chat([CONV, OTHER], GREEDY)) == [want, other]
    assert _tokens(llm.chat((CONV, OTHER), [GREEDY, GREEDY])) == [want, other]
    parts = [CONV[0], {"role": "user", "content": [{"type": "text", "text": "import os"}]}]
    assert _tokens(llm.chat(parts, GREEDY)) == [want]  # content as text parts, as the server takes it


@pytest.mark.parametrize(
    "bad",
    ["hello", {"role": "user", "content": "hi"}, ["hello"], [CONV, "hello"], [{"content": "hi"}], 42, [[CONV]]],
)
def test_other_chat_forms_are_a_type_error_naming_the_forms(llm, bad):
    with pytest.raises(TypeError, match="list of conversations"):
        llm.chat(bad, GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_chat_content_other_than_text_is_a_type_error(llm):
    with pytest.raises(TypeError, match="text"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], GREEDY)
    with pytest.raises(ValueError, match="empty conversation"):
        llm.chat([CONV, []], GREEDY)
