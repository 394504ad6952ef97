"""The default mode's output projection (tokenloom/models/head.py): the int4 kernel's logits with each
row's shortlist recomputed from the dense float32 weight.

On SmolLM2 (its head is the Q8_0 embedding, two 4-bit pieces on the kernel) the shortlisted logits
equal the dense head's and so does the argmax; the tail keeps the kernel's precision, bounded here
element by element by the kernel's three bfloat16 roundings (inputs, scales, outputs). Wider calls
are the dense head's exactly. A synthetic head checks the gather and scatter, and rows whose top is
tied beyond the shortlist (recomputed in full)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.prompts import GREEDY_PROMPTS
from tokenloom.attention.paged import AttentionMetadata
from tokenloom.cache.kv_cache import KVCache
from tokenloom.loading import load_model
from tokenloom.loading.export import hf_state_dict
from tokenloom.models.head import ShortlistHead, exact_heads, top_k
from tokenloom.models.linear import Int4Linear
from tokenloom.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

K = ShortlistHead.SHORTLIST
BF16_ROUNDING = 2.0**-9  # relative rounding of bfloat16 (8 significant bits, round to nearest)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf)


def _hidden(model, ids: list[int]) -> torch.Tensor:
    """The final hidden states [len(ids), hidden] of one prompt."""
    config = model.config
    cache = KVCache(config.num_hidden_layers, 1, len(ids), config.num_key_value_heads, config.head_dim,
                    torch.float32, torch.device("cpu"))  # fmt: skip
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [[0]], len(ids), torch.device("cpu"), input_ids=ids)
    return model(meta.input_ids, meta.positions, cache, meta)


@pytest.fixture(scope="module")
def hidden(smollm2) -> torch.Tensor:
    """Every position of 8 prompts (the last ones first), float32 [rows, 576]."""
    tokenizer = Tokenizer.from_source(smollm2.checkpoint.source)
    with torch.inference_mode():
        states = [_hidden(smollm2.model, tokenizer.encode(p)) for p in GREEDY_PROMPTS[:8]]
    return torch.cat([torch.stack([s[-1] for s in states]), *[s[:-1] for s in states]])


def test_the_default_mode_gets_a_shortlist_head_on_the_tied_weight(smollm2) -> None:
    model = smollm2.model
    head = model.lm_head
    assert isinstance(head, ShortlistHead) and head.shortlist == K and head.max_kernel_rows == 16
    assert head.weight is model.model.embed_tokens.weight and head.weight.dtype == torch.float32
    assert (head.in_features, head.out_features) == (576, 49152)
    fresh = load_model(smollm2.checkpoint.source.path).model
    assert fresh.lm_head.approximate is None  # the load check ran the dense weight: nothing built
    with exact_heads(fresh), torch.inference_mode():
        fresh.lm_head(torch.zeros(3, 576))
    assert fresh.lm_head.approximate is None and not fresh.lm_head.exact_only
    exact = load_model(smollm2.checkpoint.source.path, dtype="float32").model
    assert type(exact.lm_head) is not ShortlistHead  # the exact mode keeps its dense head


def test_shortlisted_logits_and_argmax_are_the_dense_heads(smollm2, hidden) -> None:
    """Rows of 8 (decode-sized calls): the shortlist's logits equal F.linear's within 1e-4 (float32
    summation order), the argmax is F.linear's, and every other logit is within the kernel's error:
    inputs and scales rounded to bfloat16 (2**-9 of each |w x| term each) and the output rounded to
    bfloat16 (2**-9 of |logit|). Measured on these 52 rows: at most 0.25 (1.0% of the row's largest
    |logit|), 0.63 of that bound; on the 640 decode rows of the 20 greedy prompts 0.30 (1.3%), 0.75."""
    head = smollm2.model.lm_head
    weight = head.weight
    worst = 0.0
    with torch.inference_mode():
        for start in range(0, hidden.shape[0], 8):
            x = hidden[start : start + 8]
            exact = F.linear(x, weight)
            got = head(x)
            approximate = head.approximate_kernel()(x)
            top = top_k(approximate, K)[1]
            assert (got.gather(1, top) - exact.gather(1, top)).abs().max() <= 1e-4
            assert torch.equal(got.argmax(-1), exact.argmax(-1))
            terms = F.linear(x.abs(), weight.abs())  # sum_i |w_ji x_i|
            bound = BF16_ROUNDING * (exact.abs() + 2 * terms) * 1.01 + 1e-5
            error = (got - exact).abs()
            assert (error <= bound).all(), float((error / bound).max())
            worst = max(worst, float((error / bound).max()))
    assert worst > 0.05  # the tail does come from the kernel


def test_calls_wider_than_the_kernels_are_the_dense_heads(smollm2, hidden) -> None:
    head = smollm2.model.lm_head
    with torch.inference_mode():
        for rows in (17, 40):
            x = hidden[:rows]
            assert torch.equal(head(x), F.linear(x, head.weight))
        assert head(hidden[:0]).shape == (0, 49152)


def test_the_kernel_is_no_part_of_the_state_dict(smollm2, hidden) -> None:
    model = smollm2.model
    with torch.inference_mode():
        model.lm_head(hidden[:1])
    assert isinstance(model.lm_head.approximate, Int4Linear) and model.lm_head.approximate.pieces == 2
    assert [name for name in model.state_dict() if name.startswith("lm_head.")] == ["lm_head.weight"]
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    assert "lm_head.weight" in names
    state = hf_state_dict(model)
    assert torch.equal(state["lm_head.weight"], model.model.embed_tokens.weight)


def _synthetic_head(vocab: int, hidden: int, seed: int, duplicate: int = 0) -> ShortlistHead:
    """Q8_0-like weights (8-bit codes, one scale per 32 columns, w = (code - 128) * scale) whose first
    `duplicate` rows are copies of row 0, as a shortlist head over the same codes on the kernel."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (vocab, hidden), generator=g, dtype=torch.uint8)
    scales = torch.rand(vocab, hidden // 32, generator=g) * 0.01 + 0.001
    if duplicate:
        codes[:duplicate], scales[:duplicate] = codes[0], scales[0]
    offsets = -128 * scales
    dense = (codes.float().view(vocab, -1, 32) - 128) * scales[..., None]
    weight = nn.Parameter(dense.view(vocab, hidden), requires_grad=False)

    def kernel(device: torch.device) -> Int4Linear:
        return Int4Linear.from_affine(codes, scales, offsets, 8, 32, device)

    return ShortlistHead(weight, kernel, max_kernel_rows=16)


def test_the_scatter_writes_the_shortlist_over_the_kernels_logits() -> None:
    head = _synthetic_head(vocab=1024, hidden=64, seed=1)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        approximate = head.approximate_kernel()(x)
        top = approximate.topk(K, dim=-1).indices
        got = head(x)
        exact = F.linear(x, head.weight)
    chosen = torch.zeros_like(got, dtype=torch.bool).scatter_(1, top, True)
    assert (got - exact).abs()[chosen].max() <= 1e-5
    assert torch.equal(got[~chosen], approximate[~chosen])  # the tail is the kernel's, untouched
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (approximate - exact).abs().max() > 1e-4  # and it does differ from the exact logits


def test_rows_tied_beyond_the_shortlist_are_recomputed_in_full() -> None:
    """40 identical rows of W: an input that favours them ties 40 logits at the top, more than the
    shortlist holds, so the 8 left out keep their approximate value, which may exceed the exact
    one; such a row is recomputed with the dense weight. A second input with no such tie keeps
    the kernel's tail."""
    head = _synthetic_head(vocab=1024, hidden=64, seed=3, duplicate=40)
    favour = head.weight[0] / head.weight[0].norm() * 50
    other = torch.randn(64, generator=torch.Generator().manual_seed(4))
    x = torch.stack([favour, other])
    with torch.inference_mode():
        got = head(x)
        exact = F.linear(x, head.weight)
        approximate = head.approximate_kernel()(x)
    assert (got[0] - exact[0]).abs().max() <= 1e-4  # tied row: all dense (the kernel is 0.1-1 off)
    assert (approximate[0] - exact[0]).abs().max() > 1e-2
    assert int(got[0].argmax()) == int(exact[0].argmax()) == 0
    assert torch.equal(got[1].argmax(), exact[1].argmax())
    assert (got[1] == approximate[1]).sum() >= 1024 - K  # untied row: the shortlist only


def test_top_k_two_passes_give_the_largest_values() -> None:
    g = torch.Generator().manual_seed(5)
    for shape in ((3, 49152), (2, 128 * 40), (4, 1000)):
        values = torch.randn(*shape, generator=g)
        values[0, 300:340] = 9.0  # ties at the top, across blocks
        got, where = top_k(values, K)
        want = values.topk(K, dim=-1).values
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert torch.equal(values.gather(1, where), got)
        assert all(len(set(row.tolist())) == K for row in where)


def test_a_changed_weight_turns_the_head_dense() -> None:
    head = _synthetic_head(vocab=512, hidden=64, seed=6)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        head(x)
    assert head.approximate is not None
    with torch.no_grad():
        head.weight.mul_(-1.0)  # in place, as load_state_dict writes
    with torch.inference_mode():
        assert torch.equal(head(x), F.linear(x, head.weight))
    assert head.approximate is None
    head.weight = nn.Parameter(torch.randn(512, 64, generator=torch.Generator().manual_seed(8)), requires_grad=False)
    with torch.inference_mode():
        assert torch.equal(head(x), F.linear(x, head.weight))
