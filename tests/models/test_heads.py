"""RewardModel: reads the last real token whatever the padding, saves and loads, scores chat turns."""
from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig
from models.heads import RewardModel, conversation_ids, score, score_batch
from tests.stages.alignment_toy import make_tokenizer


def tiny_reward_model(seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    rm = RewardModel(GPT(GPTConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=64)))
    torch.nn.init.normal_(rm.head.weight, std=1.0)  # a non-zero head, so rewards differ between inputs
    return rm.eval()


def test_reward_reads_the_last_real_token_with_right_or_left_padding():
    rm = tiny_reward_model()
    seqs = [[5, 9, 14, 3], [7, 8], [20, 21, 22]]
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
    right = torch.zeros(3, 4, dtype=torch.long)
    left = torch.zeros(3, 4, dtype=torch.long)
    right_mask = torch.zeros(3, 4, dtype=torch.bool)
    left_mask = torch.zeros(3, 4, dtype=torch.bool)
    for i, s in enumerate(seqs):
        right[i, :len(s)], right_mask[i, :len(s)] = torch.tensor(s), True
        left[i, 4 - len(s):], left_mask[i, 4 - len(s):] = torch.tensor(s), True
    torch.testing.assert_close(rm(right, right_mask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rm(left, left_mask), alone, atol=1e-5, rtol=1e-5)
    assert len(set(alone.tolist())) == 3


def test_response_mask_skips_assistant_turns_inside_the_prompt():
    tok = make_tokenizer()
    prompt = [{"role": "user", "content": "Say a."}, {"role": "assistant", "content": "a"},
              {"role": "user", "content": "Say b."}]
    ids, response = conversation_ids(tok, prompt, [{"role": "assistant", "content": "b"}])
    assert tok.decode([t for t, r in zip(ids, response) if r]) == "b<|im_end|>"


def test_save_and_load_round_trip_and_backbone_stays_a_gpt(tmp_path):
    rm = tiny_reward_model()
    with torch.no_grad():
        rm.lm_weight.fill_(0.5)
    rm.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "head.safetensors").is_file()
    back = RewardModel.from_pretrained(tmp_path / "rm").eval()
    x = torch.tensor([[4, 5, 6, 7]])
    response = torch.tensor([[False, False, True, True]])
    torch.testing.assert_close(back(x, response_mask=response), rm(x, response_mask=response))
    assert back.lm_weight.item() == 0.5
    gpt = GPT.from_pretrained(tmp_path / "rm")  # the backbone alone still loads as a plain GPT
    torch.testing.assert_close(gpt.hidden(x), rm.backbone.hidden(x))


def test_likelihood_term_is_the_mean_log_prob_of_the_response_tokens():
    rm = tiny_reward_model()
    x = torch.tensor([[4, 5, 6, 7, 8]])
    response = torch.tensor([[False, False, True, True, False]])  # tokens 6 and 7
    logits, _ = rm.backbone(x)
    logps = torch.log_softmax(logits[0], dim=-1)
    expected = rm(x) + (logps[1, 6] + logps[2, 7]) / 2  # lm_weight starts at 1
    torch.testing.assert_close(rm(x, response_mask=response), expected, atol=1e-5, rtol=1e-5)


def test_score_uses_the_chat_template_and_batches_agree():
    tok, rm = make_tokenizer(), tiny_reward_model()
    prompt = [{"role": "user", "content": "Say b."}]
    ids, response = conversation_ids(tok, prompt, [{"role": "assistant", "content": "b"}])
    assert tok.decode(ids) == "<|im_start|>user\nSay b.<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    assert tok.decode([t for t, r in zip(ids, response) if r]) == "b<|im_end|>"
    expected = rm(torch.tensor([ids]), response_mask=torch.tensor([response])).item()
    assert abs(score(rm, tok, prompt, "b") - expected) < 1e-5
    batch = score_batch(rm, tok, [prompt, prompt, [{"role": "user", "content": "Please answer with c."}]], ["b", "a", "c"])
    assert abs(batch[0] - expected) < 1e-5 and batch[1] != batch[0]
