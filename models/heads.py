"""Heads on the GPT backbone: a scalar reward model.

RewardModel = a `models.gpt.GPT` backbone + `nn.Linear(d_model, 1)` applied to the final-norm hidden
state of the LAST real token of each sequence (the InstructGPT / TRL `AutoModelForSequenceClassification`
convention: a decoder sees the whole conversation only at its last position). The conversation is
rendered with the chat template, so the last token is the "\n" after the response's <|im_end|>.

    r(x, y) = w . h_last + b  +  lm_weight * mean_t log p(y_t | x, y_<t)

Deviation: the second term, the backbone's own mean log-likelihood of the response tokens (its LM
head is kept anyway), weighted by a learned scalar that starts at 1. So the reward starts as the
SFT model's own judgement and training learns corrections to it. Without it, a last-token head on a
4-layer model stays at chance on "which worked sum has the slipped digit" after 400 steps, while
the same backbone's likelihood prefers the right one 99% of the time: the model that computes each
digit knows when one is wrong, but learning to carry that to the last position takes far more data.
The term needs `response_mask` (which tokens the response wrote); without it only the head is used.

Saved as a model directory: the backbone as `GPT.save_pretrained` writes it (config.json +
model.safetensors, loadable as a plain GPT) plus `head.safetensors` (weight (1, d), bias (1,),
lm_weight ()).

    rm = RewardModel.from_pretrained(dir)
    r = score(rm, tok, [{"role": "user", "content": "What is 2 + 2?"}], "4")
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.gpt import GPT

HEAD_FILE = "head.safetensors"


class RewardModel(nn.Module):
    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.d_model, 1)
        # a zero head: the reward starts as the likelihood term alone (the SFT model's own judgement), not
        # that plus noise; the backbone still gets a gradient from the first step, through the likelihood
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.lm_weight = nn.Parameter(torch.ones(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                response_mask: torch.Tensor | None = None, with_loglik: bool = False) -> Any:
        """(B, T) ids (right or left padded; attention_mask (B, T) bool, True = real) -> (B,) rewards.
        response_mask (B, T) bool marks the response's tokens (conversation_ids' mask) for the
        likelihood term; None leaves the term out. with_loglik: (rewards, (B,) mean log-likelihood of
        each response), for a language-modelling term in the loss."""
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
            h = self.backbone.hidden(input_ids)  # (B, T, d)
        else:
            # the largest real position of each row; right padding needs no mask in a causal model
            # (real tokens never look ahead), left padding does
            pos = torch.arange(T, device=input_ids.device).expand(B, T)
            last = torch.where(attention_mask, pos, -1).amax(dim=1)  # (B,)
            right_padded = bool((attention_mask[:, 0]).all())
            h = self.backbone.hidden(input_ids, attention_mask=None if right_padded else attention_mask)
        h_last = h[torch.arange(B, device=h.device), last]  # (B, d)
        reward = self.head(h_last).squeeze(-1).float()  # (B,)
        loglik = torch.zeros(B, device=h.device)
        if response_mask is not None:
            # log p of each response token, from the hidden state before it; the LM head only where needed
            target = response_mask[:, 1:]  # (B, T-1): token t + 1 is the response's
            rows = target.nonzero()[:, 0]  # (N,) the row of each response token
            logits = self.backbone.lm_head(h[:, :-1][target])  # (N, V)
            logps = -F.cross_entropy(logits.float(), input_ids[:, 1:][target], reduction="none")  # (N,)
            total = torch.zeros(B, device=h.device).index_add_(0, rows, logps)
            loglik = total / target.sum(1).clamp(min=1).float()
            reward = reward + self.lm_weight * loglik
        return (reward, loglik) if with_loglik else reward

    def save_pretrained(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        self.backbone.save_pretrained(out)
        tensors = {k: v.detach().contiguous() for k, v in self.head.state_dict().items()}
        save_file({**tensors, "lm_weight": self.lm_weight.detach().contiguous()}, str(out / HEAD_FILE))

    @classmethod
    def from_pretrained(cls, in_dir: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        d = Path(in_dir)
        if not (d / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{d / HEAD_FILE} not found: {d} is not a reward model directory")
        model = cls(GPT.from_pretrained(d))
        tensors = load_file(str(d / HEAD_FILE))
        with torch.no_grad():
            model.lm_weight.copy_(tensors.pop("lm_weight", torch.zeros(())))  # a head saved without it never used it
        model.head.load_state_dict(tensors)
        return model.to(device)


def conversation_ids(tok: Any, prompt: list[dict[str, str]], response: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """(ids of prompt + response rendered with the chat template, mask of the response's tokens).

    The response's tokens are what the model writes: the content of the response's assistant turns
    and their closing <|im_end|> (`tok.encode_chat`'s assistant mask), not the "<|im_start|>assistant\n"
    header nor the trailing "\n". Assistant turns inside the prompt are not part of the response: the
    prompt renders to a prefix of the conversation, each turn ending in "<|im_end|>\n" before the
    special <|im_start|>, so its token count is where the response begins.
    """
    ids, assistant = tok.encode_chat(prompt + response)
    n_prompt = len(tok.encode(tok.apply_chat_template(prompt))) if prompt else 0
    return ids, [a and i >= n_prompt for i, a in enumerate(assistant)]


@torch.no_grad()
def score_batch(model: RewardModel, tok: Any, prompts: list[list[dict[str, str]]], responses: list[str],
                batch_size: int = 32) -> list[float]:
    """Reward of each (prompt messages, assistant response text); sequences longer than the backbone's
    max_seq_len keep their last max_seq_len tokens (the response end is what the head reads)."""
    if len(prompts) != len(responses):
        raise ValueError(f"score_batch: {len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    max_len = model.backbone.cfg.max_seq_len
    was_training = model.training
    model.eval()
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        convs = [conversation_ids(tok, p, [{"role": "assistant", "content": r}])
                 for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        seqs = [ids[-max_len:] for ids, _ in convs]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        response = torch.zeros((len(seqs), T), dtype=torch.bool)
        for j, (s, (_, resp)) in enumerate(zip(seqs, convs)):  # right padding
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = True
            response[j, :len(s)] = torch.tensor(resp[-max_len:])
        out.extend(model(ids.to(device), mask.to(device), response.to(device)).tolist())
    model.train(was_training)
    return out


def score(model: RewardModel, tok: Any, prompt_messages: list[dict[str, str]], response_text: str) -> float:
    """Reward of one assistant response to a prompt (a list of chat messages)."""
    return score_batch(model, tok, [prompt_messages], [response_text])[0]
