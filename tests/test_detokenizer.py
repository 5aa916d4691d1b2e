"""IncrementalDetokenizer: streaming text that never shows half characters, and stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from checkpoints import save_tokenizer

from dynserve.engine.detokenizer import IncrementalDetokenizer
from dynserve.tokenizer import Tokenizer

MULTIBYTE = "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 ok \U0001f389\U0001f468\u200d\U0001f469\u200d\U0001f467 end"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    d: Path = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return Tokenizer.from_dir(d)


def _stream(tok: Tokenizer, ids: list[int], chunk: int = 1, finish: bool = True, **kw) -> tuple[list[str], object]:
    det = IncrementalDetokenizer(tok, tok.encode("prompt: "), **kw)
    deltas = []
    for i in range(0, len(ids), chunk):
        det.update(ids[i : i + chunk])
        deltas.append(det.get_delta())
        if det.stop_string_hit is not None:
            break
    if finish:
        det.finish()
        deltas.append(det.get_delta())
    return deltas, det


def test_multibyte_split_never_yields_replacement_char(tok):
    ids = tok.encode(MULTIBYTE)
    # the test is only meaningful if some characters really are split across byte-level tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for chunk in (1, 2, 3):
        deltas, det = _stream(tok, ids, chunk)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids) == MULTIBYTE
        assert det.output_text == MULTIBYTE


def test_deltas_concatenate_to_decode(tok):
    rng = random.Random(0)
    for text in ["def hello(name):\n    return 'hello ' + name\n", "x" * 200 + " \u00fc" * 100]:
        ids = tok.encode(text)
        deltas, _ = _stream(tok, ids, rng.randint(1, 3))
        assert "".join(deltas) == tok.decode(ids) == text


def test_random_tokens_match_full_decode(tok):
    # arbitrary byte-level tokens, including ones that form invalid UTF-8, still add up to decode()
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(7, tok.vocab_size) for _ in range(rng.randint(1, 40))]
        deltas, _ = _stream(tok, ids, rng.randint(1, 3))
        assert "".join(deltas) == tok.decode(ids)


def test_sentencepiece_style_leading_space_after_prompt(tmp_path):
    from checkpoints import _CORPUS
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(_CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"]))
    backend.save(str(tmp_path / "tokenizer.json"))
    sp = Tokenizer.from_dir(tmp_path)
    prompt = sp.encode("The quick")
    out = sp.encode("The quick brown fox")[len(prompt) :]
    assert sp.decode(out) == "brown fox"  # decoded alone, the space is lost
    det = IncrementalDetokenizer(sp, prompt)
    for t in out:
        det.update([t])
    det.finish()
    assert det.output_text == " brown fox"


def test_special_tokens_skipped_or_kept(tok):
    ids = tok.encode("<|assistant|>hi \U0001f600<|end|>")
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == "hi \U0001f600"
    deltas, _ = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == "<|assistant|>hi \U0001f600<|end|>"


def test_stop_string_across_tokens_is_caught_and_excluded(tok):
    ids = tok.encode("hello STOP world")
    assert len([t for t in tok.convert_ids_to_tokens(ids) if t in "STOP"]) >= 2  # it spans tokens
    deltas, det = _stream(tok, ids, stop=["STOP"])
    assert det.stop_string_hit == "STOP"
    assert det.output_text == "".join(deltas) == "hello "
    assert not any(c in "".join(deltas) for c in "STOP")
    assert det.update(tok.encode(" more")) == "STOP"  # later tokens are ignored
    assert det.output_text == "hello "


def test_stop_string_included_when_asked(tok):
    ids = tok.encode("hello STOP world")
    deltas, det = _stream(tok, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert det.stop_string_hit == "STOP"
    assert "".join(deltas) == "hello STOP"


def test_earliest_stop_string_wins_and_text_inside_token(tok):
    ids = tok.encode("The quick brown fox")
    _, det = _stream(tok, ids, stop=["fox", "quick"])
    assert det.stop_string_hit == "quick" and det.output_text == "The "
    _, det = _stream(tok, ids, stop=["ick br"])
    assert det.output_text == "The qu"


def test_prefix_of_stop_string_is_held_then_released(tok):
    ids = tok.encode("hello STAR now")
    det = IncrementalDetokenizer(tok, tok.encode("p"), stop=["STOP"])
    seen = ""
    for t in ids:
        det.update([t])
        seen += det.get_delta()
        # whatever has been released never ends with a proper prefix of "STOP"
        assert not any(seen.endswith("STOP"[:k]) for k in range(1, 4))
        assert seen == det.output_text
        if seen == "hello ":
            held_at_st = det._pending  # "ST" waits: it could still become "STOP"
    assert held_at_st == "ST"
    assert det.stop_string_hit is None
    assert seen == "hello STAR now"


def test_held_prefix_released_by_finish(tok):
    ids = tok.encode("hello ST")
    deltas, det = _stream(tok, ids, finish=False, stop=["STOP"])
    assert "".join(deltas) == "hello "
    assert det.finish() == "ST"
    assert det.get_delta() == "ST"
    assert det.output_text == "hello ST"
    assert det.finish() == "" and det.get_delta() == ""  # idempotent


def test_min_tokens_defers_stop_strings(tok):
    ids = tok.encode("STOP then STOP")
    _, det = _stream(tok, ids, stop=["STOP"], min_tokens=len(tok.encode("STOP then")))
    assert det.stop_string_hit == "STOP"
    assert det.output_text == "STOP then "


def test_window_stays_small(tok):
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40)
    det = IncrementalDetokenizer(tok, [], stop=["never"])
    for t in ids:
        det.update([t])
        assert len(det._tokens) <= 80  # decoding cost per token does not grow with the output
    det.finish()
    assert det.output_text == tok.decode(ids)
