"""Held-out evaluation: prompts in ChatML with the generation prompt, answers back in input order,
grading by each row's verifier, few-shot prompts for the base model built from same-task train rows."""
from __future__ import annotations

import torch

from models.gpt import GPT, GPTConfig
from stages.chat import evaluate
from tests.stages.test_sft import tiny_tokenizer


def row(question: str, answer: str, task: str, verifier: str = "exact", split: str = "val") -> dict:
    return {"id": question, "prompt": [{"role": "user", "content": question}], "answer": answer,
            "verifier": verifier, "task": task, "source": "test", "split": split}


def test_score_grades_with_each_rows_verifier_per_task_and_overall():
    rows = [row("What is 2 + 3?", "5", "arith", "numeric"), row("What is 4 + 4?", "8", "arith", "numeric"),
            row('Reverse "abc".', "cba", "string")]
    got = evaluate.score(rows, ["2 + 3 = 5", "9", "CBA."])
    assert got == {"acc/arith": 0.5, "acc/string": 1.0, "acc": 2 / 3}


def test_majority_baseline_answers_the_most_common_train_answer_per_task():
    train = [row("q1", "1", "count", "numeric", "train"), row("q2", "1", "count", "numeric", "train"),
             row("q3", "2", "count", "numeric", "train"), row("q4", "x", "string", split="train")]
    val = [row("v1", "1", "count", "numeric"), row("v2", "3", "count", "numeric"), row("v3", "x", "string"),
           row("v4", "y", "string")]
    assert evaluate.majority_baseline(train, val) == {"acc/count": 0.5, "acc/string": 0.5, "acc": 0.5}


def test_generate_answers_prompts_in_chatml_and_keeps_input_order(monkeypatch):
    tok = tiny_tokenizer()
    calls = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        calls.append((prompts, kw))
        # answer each prompt with its own length, so the order can be checked
        return [tok.encode(str(len(p))) for p in prompts]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    convs = [[{"role": "user", "content": "opposite of " + "hot " * n + "?"}] for n in (5, 1, 3)]
    answers = evaluate.generate_answers(torch.nn.Linear(1, 1), tok, convs, max_new_tokens=4, batch_size=2)
    lengths = [len(evaluate.prompt_ids(tok, c)) for c in convs]
    assert answers == [str(n) for n in lengths]
    assert [len(p) for p, _ in calls] == [2, 1]  # batches of at most batch_size, shortest first
    assert tok.decode(calls[0][0][0]).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert calls[0][1]["stop_ids"] == (tok.im_end_id, tok.eot_id) and calls[0][1]["temperature"] == 0.0


def test_generate_answers_does_not_depend_on_batching():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2))
    convs = [[{"role": "user", "content": q}] for q in ("opposite of hot?", "opposite of up? and more", "2 + 3?")]
    one = evaluate.generate_answers(model, tok, convs, max_new_tokens=6, batch_size=1)
    together = evaluate.generate_answers(model, tok, convs, max_new_tokens=6, batch_size=3)
    assert one == together and model.training  # left padding changes nothing; the mode is restored


def test_few_shot_text_prompt_uses_same_task_shots_and_cuts_at_the_newline(monkeypatch):
    tok = tiny_tokenizer()
    pool = [row("What is 1 + 1?", "2", "arith", "numeric", "train"), row("What is 2 + 2?", "4", "arith", "numeric", "train"),
            row('Reverse "ab".', "ba", "string", "exact", "train"), row("What is 9 + 9?", "18", "arith", "numeric", "train")]
    target = [row("What is 9 + 9?", "18", "arith", "numeric")]  # the same prompt as a pool row: never its own shot
    seen = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        seen.append(tok.decode(prompts[0]))
        return [tok.encode(" 18\nQuestion: more")]

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    got = evaluate.few_shot_base_eval(torch.nn.Linear(1, 1), tok, target, pool, k=2, fmt="text")
    assert got == {"acc/arith": 1.0, "acc": 1.0}
    text = seen[0]
    assert text.startswith("<|endoftext|>Question: What is ") and text.endswith("Question: What is 9 + 9?\nAnswer:")
    assert "Reverse" not in text and text.count("What is 9 + 9?") == 1
    shots = {block.removeprefix("<|endoftext|>") for block in text.split("\n\n")[:2]}
    assert shots == {"Question: What is 1 + 1?\nAnswer: 2", "Question: What is 2 + 2?\nAnswer: 4"}


def test_few_shot_chat_prompt_is_earlier_turns():
    tok = tiny_tokenizer()
    shots = [row("What is 1 + 1?", "2", "arith", split="train")]
    ids = evaluate.few_shot_prompt(tok, row("What is 3 + 3?", "6", "arith"), shots, "chat")
    assert tok.decode(ids) == ("<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
                               "<|im_start|>user\nWhat is 3 + 3?<|im_end|>\n<|im_start|>assistant\n")
