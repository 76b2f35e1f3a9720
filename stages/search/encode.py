"""The embedder's and the reranker's forward passes over the family's GPT (models/gpt.py).

Embedder (Qwen3-Embedding, Zhang et al. 2025): the text's tokens, then an appended <|endoftext|>;
the embedding is the final-norm hidden state at that EOS (last-token pooling: a causal decoder has
read the whole text only there), L2-normalised. Queries carry an instruction prefix, passages none:

    e(q) = normalize(h_EOS("Instruct: ...\\nQuery:" + q)),   e(p) = normalize(h_EOS(p))

Reranker (Qwen3-Reranker): query and passage in one prompt, scored by the next-token logits of
"yes" and "no" after it:

    s(q, p) = logit_yes - logit_no   (P(relevant) = sigmoid(s), Qwen's softmax over {yes, no})

The prompt is built from token pieces, PREFIX + q + MIDDLE + p + SUFFIX, each encoded on its own
(ChatML: a system turn with the instruction, the user turn "<Query>: q\\n<Document>: p", the
assistant turn opened; `passage_first` swaps the two, "<Document>: p\\n<Query>: q"). The
sentence-transformers export (stages/search/export.py) writes the same pieces into the tokenizer's
pair template, so CrossEncoder.predict tokenizes pairs exactly as we do.

Sequences are right-padded and run without an attention mask: attention is causal, so a real token
never sees the padding after it, and positions count from 0 as they do unpadded. A text longer than
the budget is cut from its end (the EOS, or the reranker's suffix, always stays).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.gpt import GPT, KVCache
from models.tokenizer import IM_END, IM_START, Tokenizer

QUERY_INSTRUCTION = "Instruct: Retrieve the Python documentation passage\nQuery:"  # 16 tiny-tokenizer tokens
RERANK_INSTRUCTION = 'Judge whether the Document answers the Query. Note that the answer can only be "yes" or "no".'


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids, right-padded, and each row's length (B,)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs], device=device)


# -- embedder ------------------------------------------------------------------------------------


def embed_ids(tok: Tokenizer, texts: Sequence[str], prefix: str, max_len: int) -> list[list[int]]:
    """Token ids of prefix + text, cut to max_len - 1, then the EOS."""
    return [ids[:max_len - 1] + [tok.eot_id] for ids in tok.encode_batch([prefix + t for t in texts])]


def embed(model: GPT, seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """(B, d) L2-normalised embeddings: the hidden state at each sequence's last token (its EOS)."""
    device = model.embed_tokens.weight.device
    ids, lengths = pad_right(seqs, pad_id, device)
    h = model.hidden(ids)  # (B, T, d)
    last = h[torch.arange(len(seqs), device=device), lengths - 1]  # (B, d)
    return F.normalize(last.float(), dim=-1)


@torch.no_grad()
def embed_texts(model: GPT, tok: Tokenizer, texts: Sequence[str], prefix: str, max_len: int,
                batch_size: int = 64) -> torch.Tensor:
    """(N, d) float32 embeddings of `texts` (in their order), batched by length."""
    seqs = embed_ids(tok, texts, prefix, max_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs), model.cfg.d_model)
    was_training = model.training
    model.eval()
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        out[idx] = embed(model, [seqs[i] for i in idx], tok.pad_id).cpu()
    model.train(was_training)
    return out


# -- reranker ------------------------------------------------------------------------------------


class RerankPrompt:
    """The reranker's prompt pieces and label tokens for one tokenizer."""

    def __init__(self, tok: Tokenizer, instruction: str = RERANK_INSTRUCTION, passage_first: bool = False):
        self.tok = tok
        self.instruction = instruction
        self.passage_first = passage_first  # "<Document>: p\n<Query>: q": the query next to the scored position
        first, second = ("<Document>", "<Query>") if passage_first else ("<Query>", "<Document>")
        self.prefix_text = f"{IM_START}system\n{instruction}{IM_END}\n{IM_START}user\n{first}: "
        self.middle_text = f"\n{second}: "
        self.suffix_text = f"{IM_END}\n{IM_START}assistant\n"
        self.prefix, self.middle, self.suffix = (tok.encode(t) for t in (self.prefix_text, self.middle_text, self.suffix_text))
        # the first token of the answer words as the assistant writes them (a small BPE may split "yes")
        self.yes_id, self.no_id = tok.encode("yes")[0], tok.encode("no")[0]
        if self.yes_id == self.no_id:
            raise ValueError("the tokenizer gives 'yes' and 'no' the same first token")

    @property
    def overhead(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def ids(self, query_ids: list[int], passage_ids: list[int], max_len: int) -> list[int]:
        """The prompt of one pair in at most max_len tokens: the query keeps up to half of what the
        template leaves, the passage the rest (each cut from its end)."""
        room = max(2, max_len - self.overhead)
        q = query_ids[:max(1, room // 2)]
        p = passage_ids[:max(1, room - len(q))]
        return self.prefix + (p + self.middle + q if self.passage_first else q + self.middle + p) + self.suffix

    def batch(self, queries: Sequence[str], passages: Sequence[str], max_len: int) -> list[list[int]]:
        qs, ps = self.tok.encode_batch(list(queries)), self.tok.encode_batch(list(passages))
        return [self.ids(q, p, max_len) for q, p in zip(qs, ps)]


def rerank_logits(model: GPT, seqs: Sequence[Sequence[int]], prompt: RerankPrompt) -> torch.Tensor:
    """(B,) scores logit_yes - logit_no at the last token of each prompt."""
    device = model.embed_tokens.weight.device
    ids, lengths = pad_right(seqs, prompt.tok.pad_id, device)
    h = model.hidden(ids)  # (B, T, d)
    last = h[torch.arange(len(seqs), device=device), lengths - 1]  # (B, d)
    w = model.lm_head.weight[[prompt.yes_id, prompt.no_id]]  # (2, d): only two rows of the head are needed
    logits = last @ w.T  # (B, 2)
    return (logits[:, 0] - logits[:, 1]).float()


def _prefix_cache(model: GPT, prefix: torch.Tensor, batch_size: int, max_len: int) -> KVCache:
    """A cache of `batch_size` rows holding the keys and values of `prefix` (1, P) in each, at pos P."""
    c = model.cfg
    one = KVCache(c.n_layers, 1, c.n_kv_heads, c.head_dim, prefix.shape[1])
    model.hidden(prefix, cache=one)
    cache = KVCache(c.n_layers, batch_size, c.n_kv_heads, c.head_dim, max_len)
    for i in range(c.n_layers):
        cache.k[i] = one.k[i].new_empty(cache.shape)
        cache.v[i] = one.v[i].new_empty(cache.shape)
        cache.k[i][:, :, :prefix.shape[1]] = one.k[i]
        cache.v[i][:, :, :prefix.shape[1]] = one.v[i]
    cache.pos = prefix.shape[1]
    return cache


@torch.no_grad()
def rerank_scores(model: GPT, prompt: RerankPrompt, queries: Sequence[str], passages: Sequence[str], max_len: int,
                  batch_size: int = 32) -> torch.Tensor:
    """(N,) scores of the pairs (queries[i], passages[i]), as rerank_logits gives them. Every prompt
    starts with the same system turn (about a third of its tokens), so it runs once: its keys and
    values are copied into each batch's cache and only the rest of each prompt is computed (the
    same causal attention, so the same scores up to float rounding)."""
    seqs = prompt.batch(queries, passages, max_len)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(len(seqs))
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    n_pre = len(prompt.prefix)
    prefix = torch.tensor([prompt.prefix], device=device)
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        ids, lengths = pad_right([seqs[i][n_pre:] for i in idx], prompt.tok.pad_id, device)  # (B, T - P)
        cache = _prefix_cache(model, prefix, len(idx), n_pre + ids.shape[1])
        h = model.hidden(ids, cache=cache)  # (B, T - P, d)
        last = h[torch.arange(len(idx), device=device), lengths - 1]  # (B, d)
        logits = last @ model.lm_head.weight[[prompt.yes_id, prompt.no_id]].T  # (B, 2)
        out[idx] = (logits[:, 0] - logits[:, 1]).float().cpu()
    model.train(was_training)
    return out
