"""Load generator and scenarios (routing sweep, soak, side by side with vLLM) against a running
OpenAI-compatible server on loopback. See loadtests/README.md."""

from __future__ import annotations
