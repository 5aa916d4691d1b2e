"""The demo model shipped inside the package (dynserve/assets/default_model): complete, small, and trained.

These tests load the shipped checkpoint with Hugging Face transformers (the reference implementation),
routed as the checkpoint says (its routing.json: top-p with raw probabilities, through the training
script's MoE forward; without one, Mixtral's top-2), and check what a user of `dynserve serve` with no
MODEL_DIR would notice: the files are there, the model is a Mixtral-style MoE, it is small, its
tokenizer is lossless on Python source, it predicts held-out standard-library code far better than
chance, and its greedy output looks like Python.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import dynserve

MODEL_DIR = Path(dynserve.__file__).parent / "assets" / "default_model"
REQUIRED = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "heldout.txt", "TRAINING.md"]


def shipped_routing() -> dict | None:
    """The routing fields of the shipped routing.json (None without one: Mixtral's own top-2)."""
    path = MODEL_DIR / "routing.json"
    return json.loads(path.read_text())["routing"] if path.is_file() else None


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    routing = shipped_routing()
    if routing is not None:
        from dynserve.bench.train_demo import TopPRouting

        assert routing == {"policy": "top_p", "p": routing["p"], "renormalize": False}, routing
        model.top_p_routing = TopPRouting(model, routing["p"])  # the rule it was trained with
    return model, tok


@pytest.fixture(scope="module")
def heldout_ids() -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    text = (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")
    return tok.encode(text, add_special_tokens=False).ids[:513]


def test_shipped_directory_has_every_file_and_fits_the_size_budget():
    for name in REQUIRED:
        assert (MODEL_DIR / name).is_file(), name
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024, f"{total / 1e6:.1f} MB"
    assert (MODEL_DIR / "heldout.txt").stat().st_size <= 200 * 1024


def test_config_is_a_mixtral_moe_with_8_experts_top2():
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["num_local_experts"] == 8
    assert cfg["num_experts_per_tok"] == 2
    assert cfg["max_position_embeddings"] >= 512
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json")).get_vocab_size() <= cfg["vocab_size"]


def test_tokenizer_round_trips_python_source_and_has_single_id_specials():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    source = (
        "class Point:\n"
        '    """A point; caf\u00e9 \u65e5\u672c \U0001f600."""\n\n'
        "    def __init__(self, x: float, y: float) -> None:\n"
        "        self.x, self.y = x, y\t# tab\r\n"
        "\n\n\n"
        "print({'a': [1, 2.5e-3, 0xFF]}, end='')\n"
    )
    ids = tok.encode(source, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == source
    assert len(ids) < len(source.encode("utf-8")) * 0.6  # BPE merges learned on Python source
    for special in ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]:
        assert tok.encode(special, add_special_tokens=False).ids == [tok.token_to_id(special)]


def test_tokenizer_config_declares_eos_and_a_working_chat_template():
    import jinja2

    cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|endoftext|>"
    assert cfg["bos_token"] == "<|endoftext|>"
    assert cfg["add_bos_token"] is False
    template = jinja2.Environment().from_string(cfg["chat_template"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = template.render(messages=messages, add_generation_prompt=True)
    assert rendered == "<|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert template.render(messages=messages, add_generation_prompt=False).endswith("<|user|>\nhi<|end|>\n")


def test_heldout_loss_is_far_below_chance(hf_model, heldout_ids):
    import torch

    model, _ = hf_model
    ids = torch.tensor([heldout_ids])  # [1, 513]
    assert ids.shape[1] == 513
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits  # [1, 512, V]
    loss = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item()
    uniform = math.log(model.config.vocab_size)
    # uniform guessing scores ln(V) = 8.3 here and a unigram model about 7.0; the shipped model ~3.8
    assert loss < 0.6 * uniform, f"held-out loss {loss:.3f} vs ln(V) = {uniform:.3f}"


def test_router_spreads_tokens_over_all_experts(hf_model, heldout_ids):
    import torch

    model, _ = hf_model
    ids = torch.tensor([heldout_ids[:512]])  # [1, 512]
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(out.router_logits) == model.config.num_hidden_layers
    routing = getattr(model, "top_p_routing", None)
    for layer, logits in enumerate(out.router_logits):
        if routing is not None:  # the experts top-p routing chose
            share = routing.masks[layer].float().sum(0) / routing.masks[layer].sum()  # [8]
        else:
            top2 = logits.reshape(-1, 8).topk(2, dim=-1).indices  # [T, 2]
            share = torch.bincount(top2.flatten(), minlength=8).float() / top2.numel()  # [8]
        assert share.min() > 0.01, f"layer {layer}: an expert is (almost) never chosen: {share.tolist()}"


def test_greedy_generation_looks_like_python(hf_model):
    import torch

    model, tok = hf_model
    prompt = "class Cache:\n    def __init__(self"
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 10, repr(text)
    assert "(" in text and ("\n" in text or ":" in text), repr(text)
    assert sum(c.isascii() for c in text) / len(text) > 0.95, repr(text)


def test_sampled_generation_uses_python_vocabulary(hf_model):
    import torch

    model, tok = hf_model
    inputs = tok(["import", "def", "class", "    if"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=40, do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=tok.eos_token_id
        )  # [4, P+40]
    text = "\n".join(tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    words = set(text.replace("(", " ").replace(")", " ").replace(".", " ").replace(":", " ").split())
    keywords = {"self", "return", "if", "def", "in", "not", "None", "for", "is", "import", "else", "raise", "and"}
    assert len(words & keywords) >= 3, repr(text)
    assert sum(c.isascii() for c in text) / len(text) > 0.95, repr(text)
