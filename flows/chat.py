"""`family chat --model NAME`: talk to a chat model of the family in the terminal.

Interactive mode keeps the conversation (multi-turn) and streams the reply token by token; `/reset`
clears the history, `/exit` (or Ctrl-D) quits, Ctrl-C stops a reply mid-way or, at the prompt, quits.
`--prompt TEXT` answers one message and prints only the answer, for scripts. The model directory is
any model dir of the family (model.safetensors + config.json + tokenizer files); flows/cli.py
resolves NAME to it.

When the conversation no longer fits the model's context (max_seq_len minus the reply budget), the
oldest turns are left out of the prompt; the system message always stays.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from models.generate import stream_generate
from models.gpt import GPT
from models.quant import load_model
from models.tokenizer import Tokenizer

Messages = list[dict[str, str]]
HELP = "Type a message. /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply."


def fit_context(tok: Tokenizer, messages: Messages, budget: int) -> list[int]:
    """Prompt ids of the latest turns that fit in `budget` tokens (system message kept, oldest turns dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    for start in range(len(turns)):
        ids = tok.encode(tok.apply_chat_template(system + turns[start:], add_generation_prompt=True))
        if len(ids) <= budget:
            return ids
    # even the last message alone is too long: keep its end
    return tok.encode(tok.apply_chat_template(system + turns[-1:], add_generation_prompt=True))[-budget:]


def stream_text(tok: Tokenizer, tokens: Iterator[int]) -> Iterator[str]:
    """Text pieces as tokens arrive. A piece that ends inside a multi-byte character (decoded as
    U+FFFD) is held back until the character is complete."""
    ids: list[int] = []
    shown = ""
    for t in tokens:
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown):]
        shown = text


def reply(model: GPT, tok: Tokenizer, messages: Messages, max_new_tokens: int, temperature: float,
          generator: torch.Generator) -> Iterator[str]:
    """Stream the assistant's next turn as text pieces."""
    budget = max(1, model.cfg.max_seq_len - max_new_tokens)
    ids = fit_context(tok, messages, budget)
    tokens = stream_generate(model, ids, max_new_tokens, temperature=temperature, top_p=0.95 if temperature > 0 else None,
                             stop_ids=(tok.im_end_id, tok.eot_id), generator=generator)
    return stream_text(tok, tokens)


def load(model_dir: Path) -> tuple[GPT, Tokenizer]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(model_dir, device=device)  # plain or quantized (chat-int4: QuantLinear)
    model.eval()
    return model, Tokenizer.load(model_dir)


def chat_main(model_dir: Path, prompt: str | None, max_new_tokens: int, temperature: float, system: str | None) -> int:
    """Run the chat; returns the process exit code (0 ok, 2 unusable model directory)."""
    model_dir = Path(model_dir)
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (model_dir / f).is_file()]
    if missing:
        print(f"error: {model_dir} is not a model directory (missing {', '.join(missing)}); "
              f"run the stage that builds it first", file=sys.stderr)
        return 2
    model, tok = load(model_dir)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    history: Messages = [{"role": "system", "content": system}] if system else []

    if prompt is not None:
        answer = "".join(reply(model, tok, history + [{"role": "user", "content": prompt}], max_new_tokens,
                               temperature, generator))
        print(answer.strip())
        return 0

    print(f"{model_dir.name}: {HELP}", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            return 0
        if command == "/reset":
            history = history[:1] if system else []
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        pieces = []
        try:
            for piece in reply(model, tok, history, max_new_tokens, temperature, generator):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="", file=sys.stderr)
        print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
