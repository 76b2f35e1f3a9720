"""models/generate.py: cache vs no cache, left padding, sampling filters, stop tokens, streaming."""
from __future__ import annotations

import pytest
import torch

from models.generate import draw, generate, sample_next, stream_generate
from models.gpt import GPT, GPTConfig

V = 61


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=False)).eval()
    # larger weights than the 0.02 init so greedy continuations vary instead of repeating one token
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return m


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def test_greedy_with_cache_equals_without_cache_batch_1(model):
    p = prompts([7])
    cached = generate(model, p, 20)
    assert len(cached[0]) == 20 and len(set(cached[0])) > 3  # a real continuation, not one repeated token
    assert cached == generate(model, p, 20, use_cache=False)


def test_left_padded_batch_equals_each_prompt_alone(model):
    p = prompts([3, 9, 1, 6])
    batched = generate(model, p, 16)
    assert batched == [generate(model, [q], 16)[0] for q in p]
    assert batched == generate(model, p, 16, use_cache=False)
    assert len(set(map(tuple, batched))) == 4


def test_generation_may_run_past_max_seq_len(model):
    out = generate(model, prompts([60]), 10)
    assert len(out[0]) == 10
    assert out == generate(model, prompts([60]), 10, use_cache=False)


def test_stop_tokens_end_each_row_and_are_excluded(model):
    p = prompts([5, 8])
    free = generate(model, p, 12)
    stop = free[0][4]
    first = free[0].index(stop)
    out = generate(model, p, 12, stop_ids=(stop,))
    assert out[0] == free[0][:first]
    row1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert out[1] == row1
    assert generate(model, p, 12, stop_ids=(free[0][0], free[1][0])) == [[], []]  # both stop at once


def test_zero_new_tokens_and_empty_prompt(model):
    assert generate(model, prompts([4, 2]), 0) == [[], []]
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)


def test_top_k_samples_only_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0, 2.8]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = set(sample_next(logits, temperature=1.0, top_k=3, generator=g).tolist())
    assert drawn == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    # sorted: 0.5, 0.3 (mass before it 0.5), 0.15 (0.8), 0.05 (0.95)
    assert set(sample_next(logits, temperature=1.0, top_p=0.7, generator=g).tolist()) == {1, 3}
    assert set(sample_next(logits, temperature=1.0, top_p=0.85, generator=g).tolist()) == {1, 3, 2}
    assert set(sample_next(logits, temperature=1.0, top_p=0.4, generator=g).tolist()) == {1}
    both = sample_next(logits, temperature=1.0, top_k=3, top_p=0.99, generator=g)
    assert set(both.tolist()) == {1, 3, 2}


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    p = prompts([4, 7])
    a = generate(model, p, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, p, 12, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert a == b
    assert generate(model, p, 12, temperature=0.7, top_k=1) == generate(model, p, 12)


def test_stream_generate_yields_the_greedy_tokens_then_stops(model):
    p = prompts([6])[0]
    full = generate(model, [p], 15)[0]
    assert list(stream_generate(model, p, 15)) == full
    stop = full[5]
    assert list(stream_generate(model, p, 15, stop_ids=(stop,))) == full[:full.index(stop)]


def test_draw_follows_the_distribution_and_never_draws_a_token_without_mass():
    probs = torch.tensor([0.05, 0.5, 0.0, 0.15, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    drawn = draw(probs.repeat(100_000, 1), g)
    freq = torch.bincount(drawn, minlength=6).double() / 100_000
    assert freq[2] == 0 and freq[5] == 0
    assert (freq - probs.double()).abs().max() < 0.01  # 4 standard errors of the largest share
    assert torch.equal(draw(probs.repeat(50, 1), torch.Generator().manual_seed(7)),
                       draw(probs.repeat(50, 1), torch.Generator().manual_seed(7)))


def test_draw_at_the_top_of_the_cdf_takes_the_last_token_with_mass(monkeypatch):
    """A uniform of (almost) 1 times the row's total can round up to the total: the answer is then the
    last token with probability, not an index past the vocabulary or a token cut by top-k."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(a[0], 1, dtype=torch.float64))
    probs = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert draw(probs).tolist() == [1, 3]
