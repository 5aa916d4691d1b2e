"""Tokenizer: parity with transformers.AutoTokenizer on the test tokenizer, config variants, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest
from checkpoints import save_tokenizer

from dynserve.tokenizer import Tokenizer

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "caf\u00e9 \u00fc\u00f1\u00ee\u00e7\u00f8d\u00e9 \u65e5\u672c\u8a9e",
    "emoji \U0001f600\U0001f389 and a family \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "<|user|>hi there<|end|>\n<|assistant|>",
    "  leading spaces\n\ttabs\r\nand CRLF",
    "",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say caf\u00e9 \U0001f600"},
    {"role": "assistant", "content": "caf\u00e9"},
    {"role": "user", "content": "again"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return d


def _variant(src: Path, dst: Path, **config_changes: object) -> Path:
    """A copy of the test tokenizer with tokenizer_config.json keys changed (None deletes)."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    for k, v in config_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


def _hf(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def test_matches_transformers(tok_dir):
    ours, hf = Tokenizer.from_dir(tok_dir), _hf(tok_dir)
    assert len(ours) == len(hf)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        hf.bos_token_id,
        hf.eos_token_id,
        hf.pad_token_id,
    )
    assert set(hf.all_special_ids) <= set(ours.all_special_ids)
    for text in TEXTS:
        for add in (True, False):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == hf.encode(text, add_special_tokens=add), text
        ids = ours.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    for gen in (True, False):
        ours_text = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours_text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        hf_ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
        hf_ids = hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids
        assert ours.encode_chat(MESSAGES, add_generation_prompt=gen) == hf_ids
    assert ours.apply_chat_template(MESSAGES).endswith("<|assistant|>\n")


def test_skip_special_tokens_drops_specials(tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode("<|user|>hi<|end|>")
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|user|>hi<|end|>"
    assert tok.id_to_token(tok.eos_token_id) == "<|eos|>"
    assert tok.eos_token_id in tok.all_special_ids


def test_add_bos_token_and_addedtoken_dicts(tok_dir, tmp_path):
    # the legacy AddedToken serialisation found in older checkpoints' tokenizer_config.json
    bos = {"__type": "AddedToken", "content": "<|bos|>", "lstrip": False, "rstrip": False, "normalized": False}
    eos = {"__type": "AddedToken", "content": "<|eos|>", "lstrip": False, "rstrip": False, "normalized": False}
    d = _variant(tok_dir, tmp_path / "bos", add_bos_token=True, bos_token=bos, eos_token=eos)
    ours, hf = Tokenizer.from_dir(d), _hf(d)
    assert ours.bos_token == "<|bos|>" and ours.eos_token_id == hf.eos_token_id == 1
    for text in TEXTS:
        # an explicit add_bos_token is honoured (as transformers 4's Llama-family tokenizers and vLLM do);
        # transformers 5 ignores it whenever a tokenizer.json exists, so compare with its ids plus BOS
        assert ours.encode(text) == [ours.bos_token_id] + hf.encode(text)
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    d2 = _variant(tok_dir, tmp_path / "eos", add_bos_token=True, add_eos_token=True)
    tok2 = Tokenizer.from_dir(d2)
    assert tok2.encode("hi") == [tok2.bos_token_id, *tok2.encode("hi", add_special_tokens=False), tok2.eos_token_id]


def test_template_with_bos_is_not_doubled(tok_dir, tmp_path):
    tpl = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    d = _variant(tok_dir, tmp_path / "bosT", add_bos_token=True, chat_template=tpl)
    tok = Tokenizer.from_dir(d)
    ids = tok.encode_chat(MESSAGES[:2])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids == tok.encode(tok.apply_chat_template(MESSAGES[:2]), add_special_tokens=False)
    assert tok.encode(tok.apply_chat_template(MESSAGES[:2]))[:2] == [tok.bos_token_id] * 2  # what it avoids
    hf_ids = _hf(d).apply_chat_template(MESSAGES[:2], tokenize=True, add_generation_prompt=True)
    assert ids == (hf_ids["input_ids"] if not isinstance(hf_ids, list) else hf_ids)


def test_template_list_form_tools_and_tojson(tok_dir, tmp_path):
    default = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tool_use = "TOOLS {{ tools | tojson }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    d = _variant(
        tok_dir,
        tmp_path / "multi",
        chat_template=[{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}],
    )
    tok = Tokenizer.from_dir(d)
    msgs = [{"role": "user", "content": "caf\u00e9"}]
    tools = [{"type": "function", "function": {"name": "f\u00fc", "parameters": {}}}]
    assert tok.apply_chat_template(msgs) == "caf\u00e9"
    rendered = tok.apply_chat_template(msgs, tools=tools)
    assert rendered.startswith("TOOLS ") and "f\u00fc" in rendered  # tojson keeps non-ASCII text
    hf = _hf(d)
    assert rendered == hf.apply_chat_template(msgs, tools=tools, tokenize=False, add_generation_prompt=True)


def test_chat_template_jinja_file_wins(tok_dir, tmp_path):
    d = _variant(tok_dir, tmp_path / "jinja")
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}\n    {% if m.role %}[{{ m.role }}] {{ m.content }}\n{% endif %}\n{% endfor %}"
        "{{ eos_token }}"
    )
    tok = Tokenizer.from_dir(d)
    out = tok.apply_chat_template(MESSAGES[:2])
    assert out == "[system] You are terse.\n[user] Say caf\u00e9 \U0001f600\n<|eos|>"  # trim/lstrip_blocks
    assert out == _hf(d).apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)


def test_raise_exception_in_template(tok_dir, tmp_path):
    tpl = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    tok = Tokenizer.from_dir(_variant(tok_dir, tmp_path / "raise", chat_template=tpl))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(jinja2.TemplateError, match="first must be user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_attribute_escape(tok_dir, tmp_path):
    tpl = "{{ messages.__class__.__mro__ }}"
    tok = Tokenizer.from_dir(_variant(tok_dir, tmp_path / "evil", chat_template=tpl))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_no_chat_template_is_a_clear_error(tok_dir, tmp_path):
    tok = Tokenizer.from_dir(_variant(tok_dir, tmp_path / "nochat", chat_template=None))
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    assert not Tokenizer.exists(tmp_path)
