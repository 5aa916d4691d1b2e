"""Train the small demo MoE that ships inside the package as the default model.

The corpus is the running Python's own standard library (``.py`` files only), so the script needs
no network and no data download: every machine with Python has it. The result is a Mixtral-
architecture model (8 experts, top-2) with a byte-level BPE tokenizer, saved in Hugging Face format
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json), plus ``heldout.txt`` (a sample of held-out files, for offline evaluation
that does not depend on the stdlib version) and ``TRAINING.md`` (how it was produced).

Run::

    python -m dynserve.bench.train_demo --out dynserve/assets/default_model --minutes 25

``--minutes`` re-estimates from the measured speed, every few steps, how many steps fit in the
budget (the cosine schedule follows that count, so a shared CPU still ends with a decayed learning
rate); ``--steps N`` fixes the count, which is the exactly reproducible form (same seed, standard
library, torch build and thread count -> same weights). TRAINING.md records the N a run reached.
One thread is the default: for a model this small a second thread gains little on an idle machine
and loses several times over on a busy one.

``--routing top_p --top-p 0.4 --entropy-coef W`` trains with top-p routing instead, as "Harder Tasks
Need More Experts" (Huang et al. 2024) does: each MixtralSparseMoeBlock's forward is replaced during
training (`TopPRouting`: experts run on their selected tokens only, weighted by the raw router
probabilities), the balancing loss counts the selected pairs, and a router-entropy loss of weight W
pushes the routers to be confident (fewer experts). The checkpoint stays a standard Mixtral one;
its ``routing.json`` (top_p, p, renormalize false) makes dynserve serve it with the same rule. The
progress lines show the average experts per token.

``--k-drop Q`` (with the default ``--routing top_k``, k = 2) trains with a stochastic expert count
instead: per token and MoE layer, with probability Q only the top-1 expert runs (weight 1.0:
Mixtral's softmax renormalised over the kept expert), else the usual top-2 (`KDropRouting`). The
aim is a model as good as plain top-2 training at 2 experts that loses less when serving-time
routing spends fewer. Evaluation and the checkpoint are unchanged (top-2 config, no routing.json);
the final lines also report the held-out loss when every token uses top-1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
EOS_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# test suites, third-party packages, and encodings/ (about a hundred generated codec tables of hex
# literals: 10% of the bytes, little of the language)
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}
MAX_FILE_BYTES = 256 * 1024  # drops pydoc_data/topics.py (750 KB of prose in one string literal)
HOLDOUT_EVERY = 50  # every 50th file (by sorted path) is held out: ~2%
HELDOUT_TXT_BYTES = 200 * 1024
SAMPLE_PROMPTS = ["import os\n\n\ndef", "class Cache:\n    def __init__(self"]


@dataclass
class Corpus:
    """The stdlib source files, split deterministically into training and held-out files."""

    root: Path
    train: list[tuple[str, str]] = field(default_factory=list)  # (relative path, text)
    heldout: list[tuple[str, str]] = field(default_factory=list)


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def collect_corpus(root: Path | None = None) -> Corpus:
    """All .py files under the stdlib, sorted by path, minus tests, site-packages and huge files;
    file number i (0-based, sorted order) is held out when i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2."""
    root = root or stdlib_root()
    paths = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if p.stat().st_size > MAX_FILE_BYTES or p.stat().st_size == 0:
            continue
        paths.append(rel)
    paths.sort(key=lambda r: r.as_posix())
    corpus = Corpus(root=root)
    for i, rel in enumerate(paths):
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        target = corpus.heldout if i % HOLDOUT_EVERY == HOLDOUT_EVERY // 2 else corpus.train
        target.append((rel.as_posix(), text))
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation, no prefix space) with the special tokens first
    (``<|endoftext|>`` has id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    """tokenizer.json plus a tokenizer_config.json with bos/eos and the chat template."""
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": EOS_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def encode_files(tok, files: list[tuple[str, str]]):
    """One long id stream: each file's tokens followed by <|endoftext|>."""
    import torch

    eos = tok.token_to_id(EOS_TOKEN)
    encs = tok.encode_batch([text for _, text in files], add_special_tokens=False)
    ids: list[int] = []
    for enc in encs:
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)  # [N]


def build_model(vocab_size: int, args: argparse.Namespace, eos_id: int):
    """A randomly initialised MixtralForCausalLM of the demo size."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_position,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=args.tie,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        dtype="float32",
    )
    # grouped_mm: the experts' weights are applied per expert group without a Python loop over
    # one-hot masks; several times faster on the CPU than "eager", same math
    config._experts_implementation = "grouped_mm"
    return MixtralForCausalLM(config)


def load_balancing_loss(router_logits: tuple, top_k: int):
    """Switch-Transformer load-balancing loss computed for each MoE layer separately and averaged:
    E * sum_e(fraction of the layer's top-k assignments that go to e * mean router probability of e).
    1.0 when balanced. (transformers' Mixtral aux loss pools all layers' tokens together, which lets one
    layer collapse onto a few experts while another compensates.)"""
    import torch

    losses = []
    for logits in router_logits:  # each [T, E]
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
        chosen = probs.topk(top_k, dim=-1).indices  # [T, k]
        counts = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # [T, E]
        frac = counts.mean(0) / top_k  # [E]
        losses.append(probs.size(-1) * (frac * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def top_p_mask(probs, p: float):
    """[T, E] bool: the experts top-p routing keeps for each token, from its router probabilities
    (float32, rows sum to 1). Huang et al. 2024: sort descending, keep rank i while the
    probabilities ranked before it sum to less than p (the top expert is always kept). The ops
    are those of dynserve's `top_p` policy (dynserve/routing/policies.py), so a model trained here
    routes the same when served; the paper's code compares with `<=`, which differs only where
    a prefix sums to exactly p in float32."""
    import torch

    sorted_p, sorted_ids = torch.sort(probs, dim=-1, descending=True)  # [T, E]
    csum = torch.cumsum(sorted_p, dim=-1)  # [T, E]
    before = torch.cat([torch.zeros_like(csum[:, :1]), csum[:, :-1]], dim=1)  # [T, E]
    keep_sorted = before < torch.tensor(p, dtype=torch.float32)  # [T, E] over ranks
    return torch.zeros_like(keep_sorted).scatter_(1, sorted_ids, keep_sorted)  # [T, E] over experts


class TopPRouting:
    """Top-p routing for every MixtralSparseMoeBlock of a model, installed by patching each block's
    forward (the weights and the saved checkpoint stay standard Mixtral).

    Per MoE layer: softmax router probabilities in float32, `top_p_mask`, then each expert runs on
    its selected tokens only (index_select, one loop over the experts) and its output is weighted
    by the token's RAW router probability (not renormalised over the kept experts: the paper's
    rule, and dynserve's top_p with renormalize=false). The last forward's probabilities and masks
    are kept in `self.probs` / `self.masks` (one [T, E] per layer) for the losses and the logs."""

    def __init__(self, model, p: float) -> None:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        self.p = p
        self.probs: list = []
        self.masks: list = []
        self.blocks = [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]
        for block in self.blocks:
            block.forward = self._forward_for(block)

    def reset(self) -> None:
        self.probs, self.masks = [], []

    def _forward_for(self, block):
        import torch

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if len(self.probs) == len(self.blocks):  # a new model forward: drop the last one's stats
                self.reset()
            B, S, H = hidden_states.shape
            x = hidden_states.reshape(-1, H)  # [T, H]
            router_logits, _, _ = block.gate(x)  # [T, E] (through the gate: output_router_logits still works)
            probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
            with torch.no_grad():
                mask = top_p_mask(probs, self.p)  # [T, E]
            experts = block.experts
            out = torch.zeros_like(x)  # [T, H]
            for e in range(experts.num_experts):
                tok = mask[:, e].nonzero().squeeze(1)  # [n_e]
                if tok.numel() == 0:
                    continue
                xs = x.index_select(0, tok)  # [n_e, H]
                gate, up = torch.nn.functional.linear(xs, experts.gate_up_proj[e]).chunk(2, dim=-1)  # [n_e, I]
                y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])  # [n_e, H]
                w = probs.index_select(0, tok)[:, e : e + 1]  # [n_e, 1] raw probability
                out.index_add_(0, tok, (y * w).to(out.dtype))
            self.probs.append(probs)
            self.masks.append(mask)
            return out.reshape(B, S, H)

        return forward


class KDropRouting:
    """Stochastic expert count for every MixtralSparseMoeBlock of a model (``--k-drop Q``), installed
    by patching each block's forward like `TopPRouting` (the saved checkpoint stays standard top-k).

    While the block is training, each token of each MoE layer keeps only its top-1 expert with
    probability `q` (weight 1.0, Mixtral's top-k softmax renormalised over the one kept expert) and
    otherwise its usual top-k experts with Mixtral's weights. The dropped experts stay in the top-k
    index with weight 0, so the experts module (grouped_mm) computes exactly the top-1 output for
    those tokens and no gradient reaches them. The draws come from a private generator seeded with
    `seed` (the training batches' generator is untouched, so a run sees the same batches as plain
    top-k training). In eval mode every token uses top-1 with probability `eval_q` (default 0: the
    checkpoint's top-k; 1.0: top-1 everywhere). The last forward's router probabilities and
    selected (token, expert) masks are kept in `self.probs` / `self.masks` (one [T, E] per layer)."""

    def __init__(self, model, q: float, seed: int = 0) -> None:
        import torch
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        self.q = q
        self.eval_q = 0.0
        self.gen = torch.Generator().manual_seed(seed)
        self.probs: list = []
        self.masks: list = []
        self.blocks = [m for m in model.modules() if isinstance(m, MixtralSparseMoeBlock)]
        for block in self.blocks:
            block.forward = self._forward_for(block)

    def reset(self) -> None:
        self.probs, self.masks = [], []

    def _forward_for(self, block):
        import torch

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if len(self.probs) == len(self.blocks):  # a new model forward: drop the last one's stats
                self.reset()
            B, S, H = hidden_states.shape
            x = hidden_states.reshape(-1, H)  # [T, H]
            router_logits, weights, index = block.gate(x)  # [T, E], [T, k], [T, k]
            q = self.q if block.training else self.eval_q
            T, k = index.shape
            with torch.no_grad():
                if q >= 1.0:
                    drop = torch.ones(T, dtype=torch.bool)  # [T]
                elif q <= 0.0:
                    drop = torch.zeros(T, dtype=torch.bool)  # [T]
                else:
                    drop = torch.rand(T, generator=self.gen) < q  # [T]
                drop = drop.to(index.device)
                keep = torch.ones_like(index, dtype=torch.bool)  # [T, k] over ranks
                keep[:, 1:] = ~drop.unsqueeze(1)
                top1 = torch.zeros_like(weights)  # [T, k]
                top1[:, 0] = 1.0
            weights = torch.where(drop.unsqueeze(1), top1, weights)  # [T, k]
            out = block.experts(x, index, weights)  # [T, H]
            self.probs.append(torch.softmax(router_logits.float(), dim=-1))
            self.masks.append(torch.zeros_like(self.probs[-1], dtype=torch.bool).scatter_(1, index, keep))
            return out.reshape(B, S, H)

        return forward


def load_balancing_loss_masks(probs: list, masks: list):
    """The per-layer balancing loss for a variable number of experts per token: E * sum_e(fraction
    of the layer's selected (token, expert) pairs that go to e * mean router probability of e),
    averaged over layers; 1.0 when balanced."""
    import torch

    losses = []
    for pr, m in zip(probs, masks, strict=True):  # each [T, E]
        counts = m.float().sum(0)  # [E]
        frac = counts / counts.sum().clamp_min(1.0)  # [E]
        losses.append(pr.size(-1) * (frac * pr.mean(0)).sum())
    return torch.stack(losses).mean()


def router_entropy_loss(probs: list):
    """Mean Shannon entropy (nats) of each token's router distribution, per MoE layer, averaged
    over layers (Huang et al. 2024's dynamic loss: low entropy = confident routers = fewer experts
    under top-p)."""
    import torch

    per_layer = [-(pr * torch.log(pr.clamp_min(1e-20))).sum(-1).mean() for pr in probs]  # each scalar
    return torch.stack(per_layer).mean()


def expert_shares(model, ids, seq_len: int, top_k: int, routing: TopPRouting | None = None) -> list[list[float]]:
    """Per layer, the fraction of the routed (token, expert) pairs each expert receives on the first
    seq_len tokens (top-k, or the top-p masks when `routing` is given)."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids[:seq_len].unsqueeze(0), output_router_logits=True)
    model.train()
    shares = []
    if routing is not None:
        for m in routing.masks:  # each [T, E]
            counts = m.float().sum(0)  # [E]
            shares.append((counts / counts.sum()).tolist())
        return shares
    for logits in out.router_logits:  # each [T, E]
        chosen = logits.topk(top_k, dim=-1).indices  # [T, k]
        counts = torch.bincount(chosen.flatten(), minlength=logits.size(-1)).float()  # [E]
        shares.append((counts / counts.sum()).tolist())
    return shares


def experts_per_token(masks: list) -> float:
    """Average number of experts per token per MoE layer in the masks of one forward."""
    return sum(float(m.sum()) for m in masks) / max(1, sum(m.size(0) for m in masks))


def checkpoint_routing(args: argparse.Namespace) -> dict:
    """The RoutingConfig file (`RoutingConfig.from_file`) that makes a top-p-trained checkpoint route as
    it was trained: top_p with this p and raw (not renormalised) weights."""
    return {
        "routing": {"policy": "top_p", "p": args.top_p, "renormalize": False},
        "training": {
            "script": "dynserve.bench.train_demo",
            "routing": "top_p",
            "top_p": args.top_p,
            "entropy_coef": args.entropy_coef,
            "aux_coef": args.aux_coef,
        },
    }


def lr_at(step: int, total: int, peak: float, warmup: int, floor_frac: float = 0.1) -> float:
    """Linear warmup to peak, then cosine down to floor_frac * peak at step == total."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1.0 - floor_frac) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def eval_loss(
    model, ids, seq_len: int, max_windows: int, routing: TopPRouting | None = None
) -> tuple[float, int, float | None]:
    """Mean next-token cross-entropy over non-overlapping windows of ids; returns (loss, tokens,
    average experts per token per MoE layer under `routing`, None without it)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    pairs, routed = 0.0, 0
    n_windows = min(max_windows, (len(ids) - 1) // seq_len)
    with torch.no_grad():
        for w in range(0, n_windows, 8):
            rows = [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(w, min(n_windows, w + 8))]
            batch = torch.stack(rows)  # [B, S+1]
            logits = model(input_ids=batch[:, :-1]).logits  # [B, S, V]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += batch[:, 1:].numel()
            if routing is not None:
                pairs += sum(float(m.sum()) for m in routing.masks)
                routed += sum(m.size(0) for m in routing.masks)
    model.train()
    return total / max(1, count), count, (pairs / routed if routing is not None and routed else None)


def heldout_sample(files: list[tuple[str, str]], limit: int) -> str:
    """Held-out files concatenated (whole files, separated by a blank line) up to limit bytes."""
    parts, size = [], 0
    for _, text in files:
        n = len(text.encode("utf-8")) + 2
        if size + n > limit:
            continue
        parts.append(text)
        size += n
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="output directory (HF checkpoint)")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for this size, and on a shared CPU)"
    )
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="experts per token with --routing top_k (saved in config.json)")
    p.add_argument(
        "--routing",
        choices=("top_k", "top_p"),
        default="top_k",
        help="training routing: top_k (Mixtral's own) or top_p (Huang et al. 2024: raw probabilities, p = --top-p)",
    )
    p.add_argument("--top-p", type=float, default=0.4, help="p of --routing top_p")
    p.add_argument(
        "--k-drop",
        type=float,
        default=0.0,
        help="with --routing top_k: per token and MoE layer, the probability of training with the top-1"
        " expert only (weight 1.0) instead of top-k (stochastic expert count; evaluation and checkpoint stay top-k)",
    )
    p.add_argument(
        "--entropy-coef",
        type=float,
        default=0.0,
        help="weight of the router-entropy loss (mean nats per token, layer)",
    )
    p.add_argument("--max-position", type=int, default=512)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.02, help="weight of the per-layer balancing loss")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of seq-len tokens")
    p.add_argument("--no-samples", action="store_true", help="skip the sample generations (quick runs such as a sweep)")
    p.add_argument(
        "--calibrate-every", type=int, default=25, help="with --minutes: re-estimate the step count this often"
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.k_drop <= 1.0:
        p.error("--k-drop must be in [0, 1]")
    if args.k_drop and args.routing != "top_k":
        p.error("--k-drop needs --routing top_k")

    import torch

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    corpus = collect_corpus()
    print(f"corpus: {corpus.root}: {len(corpus.train)} train files, {len(corpus.heldout)} held-out", flush=True)
    tok = train_tokenizer([t for _, t in corpus.train], args.vocab)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_ids = encode_files(tok, corpus.train)  # [N_train]
    held_ids = encode_files(tok, corpus.heldout)  # [N_held]
    t_data = time.time() - t_start
    print(
        f"tokenizer: vocab {vocab_size}; train tokens {len(train_ids):,}, held-out tokens {len(held_ids):,}"
        f" ({t_data:.0f}s)",
        flush=True,
    )

    model = build_model(vocab_size, args, eos_id)
    routing = TopPRouting(model, args.top_p) if args.routing == "top_p" else None
    # the k-drop draws get their own generator (seed + 1), so the batches are those of plain top-k
    kdrop = KDropRouting(model, args.k_drop, seed=args.seed + 1) if args.k_drop else None
    n_params = sum(p.numel() for p in model.parameters())
    n_active = n_params - sum(
        p.numel() * (args.experts - args.top_k) // args.experts for n, p in model.named_parameters() if ".experts." in n
    )
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active per token)", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed)
    max_start = len(train_ids) - args.seq_len - 1

    total_steps = args.steps if args.steps is not None else None
    budget_s = args.minutes * 60.0
    history: list[tuple[int, float, float]] = []  # (step, loss, aux)
    recent: list[float] = []
    recent_experts: list[float] = []
    ent = 0.0
    model.train()
    t_train = time.time()
    cpu_train = time.process_time()
    step = 0
    while True:
        if args.steps is None and step > 0 and step % args.calibrate_every == 0:
            # the CPU may be shared: re-estimate how many steps fit in the rest of the budget from the
            # mean step time so far (the cosine schedule follows the updated count)
            per_step = (time.time() - t_train) / step
            remaining = budget_s - (time.time() - t_start) - 60.0  # keep a minute for eval and saving
            total_steps = step + max(1, int(remaining / per_step))
        if total_steps is not None and step >= total_steps:
            break
        if args.steps is None and time.time() - t_start > budget_s * 1.1:
            print(f"wall-clock budget exceeded at step {step}; stopping", flush=True)
            break
        lr = lr_at(step, total_steps or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, max_start, (args.batch,), generator=gen)  # [B]
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # [B, S+1]
        for r in (routing, kdrop):
            if r is not None:
                r.reset()
        outputs = model(input_ids=batch[:, :-1])
        logits = outputs.logits  # [B, S, V]
        ce_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        if kdrop is not None:
            # the same per-layer loss over the pairs actually selected (top-1 or top-k per token)
            aux_loss = load_balancing_loss_masks(kdrop.probs, kdrop.masks)
            probs = kdrop.probs
            recent_experts.append(experts_per_token(kdrop.masks))
        elif routing is None:
            aux_loss = load_balancing_loss(outputs.router_logits, args.top_k)
            probs = [torch.softmax(lg.float(), dim=-1) for lg in outputs.router_logits] if args.entropy_coef else []
            recent_experts.append(float(args.top_k))
        else:
            aux_loss = load_balancing_loss_masks(routing.probs, routing.masks)
            probs = routing.probs
            recent_experts.append(experts_per_token(routing.masks))
        loss = ce_loss + args.aux_coef * aux_loss
        if args.entropy_coef:
            ent_loss = router_entropy_loss(probs)
            loss = loss + args.entropy_coef * ent_loss
            ent = ent_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce, aux = ce_loss.item(), aux_loss.item()
        recent.append(ce)
        step += 1
        if step % args.log_every == 0 or step == 1:
            avg = sum(recent) / len(recent)
            avg_experts = sum(recent_experts) / len(recent_experts)
            history.append((step, avg, aux))
            recent.clear()
            recent_experts.clear()
            print(
                f"step {step}/{total_steps or '?'} lr {lr:.2e} loss {avg:.4f} aux {aux:.3f}"
                f" experts/token {avg_experts:.3f}"
                + (f" entropy {ent:.3f}" if args.entropy_coef else "")
                + f" ({time.time() - t_train:.0f}s wall, {time.process_time() - cpu_train:.0f}s cpu)",
                flush=True,
            )
    train_time = time.time() - t_train
    train_cpu = time.process_time() - cpu_train

    train_loss, train_tokens, _ = eval_loss(model, train_ids, args.seq_len, args.eval_windows, routing)
    held_loss, held_tokens, held_experts = eval_loss(model, held_ids, args.seq_len, args.eval_windows, routing)
    held_experts = float(args.top_k) if held_experts is None else held_experts
    shares = expert_shares(model, held_ids, args.max_position, args.top_k, routing)
    print(
        f"final: train loss {train_loss:.4f}, held-out loss {held_loss:.4f} (perplexity {math.exp(held_loss):.3f},"
        f" {held_experts:.3f} experts/token; ln V = {math.log(vocab_size):.3f})",
        flush=True,
    )
    held_loss_top1 = None
    if routing is None:
        # robustness to fewer experts: the same held-out windows with every token on its top-1 expert
        probe = kdrop if kdrop is not None else KDropRouting(model, 0.0)
        probe.eval_q = 1.0
        held_loss_top1, _, _ = eval_loss(model, held_ids, args.seq_len, args.eval_windows)
        probe.eval_q = 0.0
        print(f"final: held-out loss at top-1 {held_loss_top1:.4f} (perplexity {math.exp(held_loss_top1):.3f})")

    model.config.output_router_logits = False
    model.save_pretrained(out)
    write_tokenizer_files(tok, out, args.max_position)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}, indent=2) + "\n"
    )
    (out / "heldout.txt").write_text(heldout_sample(corpus.heldout, HELDOUT_TXT_BYTES), encoding="utf-8")
    if routing is not None:
        # the routing the model was trained with becomes dynserve's default for this checkpoint
        (out / "routing.json").write_text(json.dumps(checkpoint_routing(args), indent=2) + "\n")
    (out / "train_result.json").write_text(
        json.dumps(
            {
                "routing": args.routing,
                "top_p": args.top_p if routing is not None else None,
                "k_drop": args.k_drop,
                "entropy_coef": args.entropy_coef,
                "steps": step,
                "seed": args.seed,
                "train_loss": train_loss,
                "heldout_loss": held_loss,
                "heldout_perplexity": math.exp(held_loss),
                "heldout_experts_per_token": held_experts,
                "heldout_loss_top1": held_loss_top1,
                "heldout_perplexity_top1": math.exp(held_loss_top1) if held_loss_top1 is not None else None,
                "train_minutes": train_time / 60,
            },
            indent=2,
        )
        + "\n"
    )
    if args.no_samples:
        print(f"saved to {out} (no samples, no TRAINING.md)", flush=True)
        return 0

    model.eval()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])  # [1, P]
        with torch.no_grad():
            sample_ids = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=eos_id)  # [1, P+60]
        samples.append(tok.decode(sample_ids[0].tolist(), skip_special_tokens=False))
    torch.manual_seed(args.seed)
    ids = torch.tensor([tok.encode("import", add_special_tokens=False).ids])  # [1, P]
    with torch.no_grad():
        sample_ids = model.generate(
            ids, max_new_tokens=100, do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=eos_id
        )  # [1, P+100]
    sampled = tok.decode(sample_ids[0].tolist(), skip_special_tokens=False)
    wall = time.time() - t_start

    cmd = "python -m dynserve.bench.train_demo " + " ".join(argv if argv is not None else sys.argv[1:])
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    excluded = ", ".join(f"`{d}/`" for d in sorted(EXCLUDED_DIRS))
    specials = ", ".join(f"`{t}`" for t in SPECIAL_TOKENS)
    curve = ", ".join(f"{s}: {lo:.2f}" for s, lo, _ in history[:: max(1, len(history) // 20)])
    lines = [
        "# Demo model: how it was produced",
        "",
        "A small Mixtral-architecture MoE trained from scratch on the CPU by `dynserve/bench/train_demo.py`.",
        "",
        "## Command",
        "",
        f"    {cmd}",
        "",
        "With `--minutes` the step count is re-estimated from the measured speed while training runs, so it",
        "depends on the machine and its load. To rerun the same number of steps anywhere (a fixed cosine",
        "schedule over them; deterministic for a given seed, thread count, torch build and standard library):",
        "",
        f"    python -m dynserve.bench.train_demo --out DIR --steps {step} --seed {args.seed} --threads {args.threads}"
        + (
            f" --routing top_p --top-p {args.top_p} --entropy-coef {args.entropy_coef}"
            if routing is not None
            else (f" --k-drop {args.k_drop}" if args.k_drop else "")
            + (f" --entropy-coef {args.entropy_coef}" if args.entropy_coef else "")
        ),
        "",
        "## Corpus",
        "",
        f"The `.py` files of the Python {platform.python_version()} standard library, sorted by path, excluding",
        f"the directories {excluded} and files over {MAX_FILE_BYTES // 1024} KB.",
        f"{len(corpus.train)} training files ({len(train_ids):,} tokens). Every {HOLDOUT_EVERY}th file"
        f" (index i % {HOLDOUT_EVERY} == {HOLDOUT_EVERY // 2}) is held out:",
        f"{len(corpus.heldout)} files ({len(held_ids):,} tokens), listed below. Files are joined with"
        " `<|endoftext|>`; training",
        "windows are drawn uniformly at random. `heldout.txt` holds whole held-out files (at most 200 KB),",
        "for offline evaluation that does not depend on the installed Python.",
        "",
        "## Tokenizer",
        "",
        f"Byte-level BPE (`tokenizers`), vocabulary {vocab_size}, trained on the training files. Special tokens:",
        f"{specials}; `<|endoftext|>` (id {eos_id}) is bos, eos and pad.",
        "Chat template: each message as `<|role|>\\ncontent<|end|>\\n`; the generation prompt is `<|assistant|>\\n`.",
        "",
        "## Model",
        "",
        f"MixtralForCausalLM: hidden {args.hidden}, {args.layers} layers, {args.heads} attention heads"
        f" ({args.kv_heads} kv), {args.experts} experts",
        f"of intermediate size {args.intermediate}, top-{args.top_k}, {'tied' if args.tie else 'untied'} embeddings,"
        f" max positions {args.max_position}.",
        f"{n_params / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active per token; float32 safetensors of"
        f" {size_mb:.1f} MB.",
        "",
        "## Training",
        "",
        f"torch {torch.__version__} on the CPU, {args.threads} thread(s), seed {args.seed}. AdamW (betas 0.9/0.95,"
        f" weight decay {args.weight_decay}),",
        f"peak lr {args.lr}, {args.warmup} warmup steps, cosine decay to 10%, gradient clipping 1.0;"
        f" batch {args.batch} x {args.seq_len} tokens;",
        *(
            [
                f'Routing: top-p, p = {args.top_p} (Huang et al. 2024, "Harder Tasks Need More Experts"): softmax'
                " router probabilities,",
                "sorted descending; an expert is kept while the probabilities ranked before it sum to less than p",
                "(the top expert always), and its output is weighted by its raw probability (not renormalised).",
                "Experts ran on their selected tokens only (a loop over the experts). `routing.json` in this",
                "directory makes the same rule dynserve's default routing for the checkpoint.",
                f"Losses: next-token cross-entropy + {args.aux_coef} x a load-balancing loss computed per MoE layer"
                " (fraction of the",
                "selected (token, expert) pairs per expert x its mean probability)"
                f" + {args.entropy_coef} x the router entropy (mean nats",
                "per token, averaged over the MoE layers).",
            ]
            if routing is not None
            else [
                f"a load-balancing loss computed per MoE layer, weight {args.aux_coef}"
                + (f", and a router-entropy loss, weight {args.entropy_coef}" if args.entropy_coef else "")
                + ". Experts ran with transformers' `grouped_mm`",
                "implementation (same math as the default; the saved checkpoint is standard).",
                *(
                    [
                        f"Stochastic expert count (`--k-drop {args.k_drop}`): per token and MoE layer, with probability"
                        f" {args.k_drop} only the",
                        "top-1 expert ran (weight 1.0, the top-2 softmax renormalised over it), else the usual top-2;"
                        " the balancing",
                        "loss counted the (token, expert) pairs actually selected. Evaluation and the checkpoint are"
                        " plain top-2.",
                    ]
                    if kdrop is not None
                    else []
                ),
            ]
        ),
        f"{step} steps ({step * args.batch * args.seq_len:,} tokens) in {train_time / 60:.1f} min of wall time"
        f" ({train_cpu / 60:.1f} min of process CPU time);",
        f"{wall / 60:.1f} min in all, with tokenizer training, encoding, evaluation and saving.",
        "",
        "## Result",
        "",
        f"- train loss ({train_tokens:,} tokens of training windows): {train_loss:.4f}",
        f"- held-out loss ({held_tokens:,} tokens of held-out files): {held_loss:.4f}",
        f"- uniform baseline ln({vocab_size}) = {math.log(vocab_size):.4f}",
        f"- average experts per token per MoE layer on those held-out tokens: {held_experts:.3f}",
        *(
            [f"- held-out loss with every token on its top-1 expert: {held_loss_top1:.4f}"]
            if held_loss_top1 is not None
            else []
        ),
        "",
        f"Share of {'top-p' if routing is not None else f'top-{args.top_k}'} assignments per expert on the"
        f" first {args.max_position} held-out tokens:",
        "",
        *[f"    layer {i}: " + " ".join(f"{x:.3f}" for x in row) for i, row in enumerate(shares)],
        "",
        "Training loss (step: mean over the logging interval):",
        "",
        *textwrap.wrap(curve, width=100, initial_indent="    ", subsequent_indent="    "),
        "",
        "Greedy continuations (60 new tokens; a model this small soon repeats itself under greedy decoding):",
        "",
        *[line for text in samples for line in ("```python", text, "```", "")],
        f"Sampled continuation of `import` (temperature 0.8, top-p 0.95, 100 tokens, seed {args.seed}):",
        "",
        "```python",
        sampled,
        "```",
        "",
        "## Held-out files",
        "",
        *[f"- `{rel}`" for rel, _ in corpus.heldout],
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))
    print(f"saved to {out} in {wall / 60:.1f} min\n--- samples ---\n" + "\n---\n".join([*samples, sampled]))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
