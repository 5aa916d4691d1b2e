"""Routed experts on the wire (`return_routed_experts: true`): nested JSON lists, or with
`routed_experts_format: "base64"` a compact CSR object.

JSON ("json", the default): a list over token positions of a list over MoE layers of expert-id lists
(ragged), `null` for a position that was not computed.

CSR ("base64"), every array little-endian and base64-encoded (standard alphabet, padded):
    {"format": "csr", "num_tokens": N, "num_layers": L,
     "dtypes": {"offsets": "int32", "expert_ids": "int32", "weights": "float32", "computed": "uint8"},
     "offsets":    [N*L + 1] int32: position i, layer l owns expert_ids[offsets[i*L+l] : offsets[i*L+l+1]],
     "expert_ids": [P] int32, in routing order,
     "weights":    [P] float32, the routing weight of each id,
     "computed":   [N] uint8, 0 for a position that was not computed (the JSON form's null)}
`decode_csr` turns it back into the JSON form (and the weights).
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from dynserve.engine import RequestOutput, RoutedExperts

ROUTED_EXPERTS_FORMATS = ("json", "base64")
CSR_DTYPES = {"offsets": "int32", "expert_ids": "int32", "weights": "float32", "computed": "uint8"}
_NP = {"int32": "<i4", "float32": "<f4", "uint8": "u1"}


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=_NP[dtype]).tobytes()).decode("ascii")


def encode_csr(rows: RoutedExperts) -> dict[str, Any]:
    """The CSR object of `rows` (see the module docstring)."""
    return {
        "format": "csr",
        "num_tokens": len(rows),
        "num_layers": rows.num_layers,
        "dtypes": dict(CSR_DTYPES),
        "offsets": _b64(rows.offsets().numpy(), "int32"),
        "expert_ids": _b64(rows.ids.numpy(), "int32"),
        "weights": _b64(rows.weights.numpy(), "float32"),
        "computed": _b64(rows.computed.numpy(), "uint8"),
    }


def decode_csr(obj: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """(ids, weights) in the JSON form's nesting from a CSR object."""
    dt = obj["dtypes"]
    arr = {k: np.frombuffer(base64.b64decode(obj[k]), dtype=_NP[dt[k]]) for k in CSR_DTYPES}
    N, L = obj["num_tokens"], obj["num_layers"]
    offsets, ids, weights, computed = arr["offsets"], arr["expert_ids"], arr["weights"], arr["computed"]
    out_ids: list[Any] = []
    out_w: list[Any] = []
    for i in range(N):
        if not computed[i]:
            out_ids.append(None)
            out_w.append(None)
            continue
        cells = [(int(offsets[i * L + j]), int(offsets[i * L + j + 1])) for j in range(L)]
        out_ids.append([ids[a:b].tolist() for a, b in cells])
        out_w.append([weights[a:b].tolist() for a, b in cells])
    return out_ids, out_w


def routed_experts_body(rows: RoutedExperts | None, fmt: str | None) -> Any:
    """`rows` in the request's format (None stays None)."""
    if rows is None:
        return None
    return encode_csr(rows) if fmt == "base64" else rows.tolist()


def add_routed_experts(body: dict[str, Any], finals: list[RequestOutput], n: int, fmt: str | None) -> None:
    """Put the routed experts into a finished (non-streamed) response `body`: per choice
    `routed_experts`; the prompt's rows top-level as `prompt_routed_experts`, or per choice when a
    completions request has several prompts (top-level null then)."""
    by_index = {c["index"]: c for c in body["choices"]}
    several = len(finals) > 1
    for i, out in enumerate(finals):
        prompt_rows = routed_experts_body(out.prompt_routed_experts, fmt)
        for c in out.outputs:
            choice = by_index.get(i * n + c.index)
            if choice is None:
                continue
            choice["routed_experts"] = routed_experts_body(c.routed_experts, fmt)
            if several:
                choice["prompt_routed_experts"] = prompt_rows
    body["prompt_routed_experts"] = (
        None if several or not finals else routed_experts_body(finals[0].prompt_routed_experts, fmt)
    )


class RoutedStreamer:
    """Routed experts in a stream: each chunk of a choice carries (`routed_experts`) the rows that
    became known since its previous chunk; a generated token's row is known once the token has been
    fed back through the model, so rows lag the delivered tokens by one, and the choice's final chunk
    carries the rest (the last token's `null` included). The first chunk of each prompt's output
    carries that prompt's rows top-level (`prompt_routed_experts`). Concatenated, a choice's chunks
    give the non-streamed `routed_experts`."""

    def __init__(self, enabled: bool, fmt: str | None) -> None:
        self.enabled = enabled
        self.fmt = fmt
        self._prompt_sent: set[int] = set()

    def rows(self, c: Any) -> RoutedExperts | None:
        """The choice's new rows, None when there are none (or none were asked for)."""
        delta = c.routed_experts_delta if self.enabled else None
        return delta if delta is not None and len(delta) else None

    def prompt(self, i: int, out: RequestOutput) -> dict[str, Any]:
        """The top-level `prompt_routed_experts` for a chunk of prompt `i`'s output: once per prompt
        (the caller sends that chunk), else {}."""
        if not self.enabled or i in self._prompt_sent or out.prompt_routed_experts is None:
            return {}
        self._prompt_sent.add(i)
        return {"prompt_routed_experts": routed_experts_body(out.prompt_routed_experts, self.fmt)}

    def add(self, target: dict[str, Any], rows: RoutedExperts | None) -> None:
        """Set `routed_experts` on a choice (its new rows; none -> an empty list / CSR)."""
        if self.enabled:
            empty = RoutedExperts.empty(rows.num_layers if rows is not None else 0)
            target["routed_experts"] = routed_experts_body(rows if rows is not None else empty, self.fmt)
