"""The bench's tables: one row per engine, then tokenloom's ratio to every other row."""

from __future__ import annotations

from tokenloom.bench.common import COLUMNS, Row, Settings


def _markdown(headers: list[str], body: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in body)) if body else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" if i else ":" + "-" * (w + 1) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep, *(line(b) for b in body)])


def format_table(rows: list[Row], s: Settings) -> str:
    """A markdown table of every figure ("-" where an engine does not measure one)."""
    keys = list(COLUMNS)
    headers = ["engine", *(s.header(k) for k in keys)]
    body = [[r.name, *(COLUMNS[k][1].format(r.values[k]) if k in r.values else "-" for k in keys)] for r in rows]
    return _markdown(headers, body)


def ratios(ours: Row, others: list[Row]) -> dict[str, dict[str, float]]:
    """ours / theirs for every figure both have, per other row. For a time (load, first token) the
    ratio is theirs / ours, so that above 1 always means tokenloom is better."""
    result: dict[str, dict[str, float]] = {}
    for other in others:
        entry = {}
        for key, (_header, _fmt, higher) in COLUMNS.items():
            a, b = ours.values.get(key), other.values.get(key)
            if a and b:
                entry[key] = a / b if higher else b / a
        if entry:
            result[other.name] = entry
    return result


def format_ratios(ours: Row, others: list[Row], s: Settings) -> str:
    table = ratios(ours, others)
    if not table:
        return ""
    keys = list(COLUMNS)
    headers = [f"{ours.name} vs", *(s.header(k) for k in keys)]
    body = [[name, *(f"{entry[k]:.2f}x" if k in entry else "-" for k in keys)] for name, entry in table.items()]
    return _markdown(headers, body)


def footer(s: Settings) -> str:
    return "\n".join([
        "load: model + tokenizer construction (tokenloom: LLM(...), including its KV cache; transformers: "
        "from_pretrained; llama-server: start until /health answers; OpenVINO: LLMPipeline(...)).",
        f"decode, 1 stream: one greedy request, {s.new_tokens} new tokens, prefill excluded (tokens after the "
        "first over the time from the first to the last; llama-bench: tg; OpenVINO: 1 / time per output token).",
        f"decode, concurrent: {s.concurrency} different short prompts x {s.new_tokens} new tokens, total generated "
        "tokens / wall time (prefill included); tokenloom: one continuous batch; transformers: one left-padded "
        f"generate; llama-server: {s.concurrency} clients at once, one slot each; OpenVINO: generate on the list.",
        f"prefill: prompt tokens / time to first token, a {s.prompt_tokens}-token prompt, different every round "
        "(llama-bench: pp).",
        f"decode at {s.long_context} context: the 1-stream decode rate after a {s.long_context}-token prompt "
        "(llama-bench: tg at that depth).",
        "chat turn 2: time to the first token of a chat's second turn, after the first turn was generated "
        "(whatever the engine keeps of the first turn it may reuse; tokenloom: its prefix cache, as in "
        "`tokenloom chat` and `serve`, emptied before each round).",
        f"Each engine took turns within each phase; figures are the best of {s.repeats} round(s) "
        f"(prefill: of {s.prefill_repeats}). EOS is ignored so each request generates exactly what was asked.",
        "Ratios: above 1 means tokenloom is better (faster, or less time for load and first token).",
    ])
