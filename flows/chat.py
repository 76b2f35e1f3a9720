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
from collections.abc import Callable, Iterator
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

    def turn(text: str) -> None:
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

    return repl(f"{model_dir.name}: {HELP}", turn, history, keep=1 if system else 0)


def repl(banner: str, turn: Callable[[str], None], history: Messages, keep: int,
         refuse: Callable[[str], str | None] = lambda text: None) -> int:
    """The interactive loop of `family chat`: /reset clears `history` down to its first `keep` messages
    (the system prompt), /exit or end of input leaves; `refuse(text)` may name why a line is not sent."""
    print(banner, file=sys.stderr)
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
            del history[keep:]
            print("(conversation cleared)", file=sys.stderr)
            continue
        reason = refuse(text)
        if reason:
            print(reason, file=sys.stderr)
            continue
        turn(text)

# -- the vision-language member: `family chat --image PATH` -------------------------------------------------


def image_count(text: str) -> int:
    """Images a prompt refers to on its own: `<image>` markers and `<|vision_start|>` tokens."""
    return text.count("<image>") + text.count("<|vision_start|>")


def load_vl(model_dir: Path, image: str | Path) -> tuple:
    """(VLModel, Tokenizer, pixels (3, S, S), note) or ValueError naming what and where."""
    from models.vision import VLModel, read_image

    try:
        model = VLModel.from_pretrained(model_dir)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{model_dir} is not a vision-language model directory ({str(e).splitlines()[0][:160]}); "
                         f"use --model vl") from None
    pixels, note = read_image(image, model.vcfg.image_size)
    return model, Tokenizer.load(model_dir), pixels, note


def vl_prompt_ids(model, tok: Tokenizer, messages: Messages) -> list[int]:
    """The chat prompt with the image's pads expanded to the model's image-token count."""
    from models.vision import expand_image_tokens

    msgs = [{**m, "content": expand_image_tokens(m["content"], model.vcfg.image_tokens)} for m in messages]
    return tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))


def vl_reply(model, tok: Tokenizer, pixels: torch.Tensor, messages: Messages, max_new_tokens: int, temperature: float,
             generator: torch.Generator) -> str:
    """The assistant's next turn about the image (in the first user turn), as text."""
    ids = vl_prompt_ids(model, tok, messages)
    with torch.inference_mode():
        model.set_images(model.image_features(pixels[None]))
        try:
            tokens = list(stream_generate(model.decoder, ids, max_new_tokens, temperature=temperature,
                                          top_p=0.95 if temperature > 0 else None, stop_ids=(tok.im_end_id, tok.eot_id),
                                          generator=generator))
        finally:
            model.set_images(None)
    return tok.decode(tokens, skip_special_tokens=True).strip()


def vl_chat_main(model_dir: Path, images: list[str], prompt: str | None, max_new_tokens: int, temperature: float,
                 system: str | None) -> int:
    """`family chat --image PATH`: questions about one image (one-shot with --prompt, else interactive)."""
    from models.vision import IMAGE_TOKEN_TEXT

    if len(images) > 1:
        print(f"error: {len(images)} images given ({', '.join(images)}); the VL model takes one image per conversation",
              file=sys.stderr)
        return 2
    if prompt is not None and image_count(prompt):
        print(f"error: the prompt refers to {image_count(prompt)} more image(s) besides --image {images[0]}; "
              f"one image per conversation is supported", file=sys.stderr)
        return 2
    opened = open_vl(Path(model_dir), images[0])
    if opened is None:
        return 2
    model, tok, pixels = opened
    generator = torch.Generator().manual_seed(0)
    history: Messages = [{"role": "system", "content": system}] if system else []

    def ask(text: str) -> str:
        first = not any(m["role"] == "user" for m in history)
        history.append({"role": "user", "content": f"{IMAGE_TOKEN_TEXT}\n{text}" if first else text})
        out = vl_reply(model, tok, pixels, history, max_new_tokens, temperature, generator)
        history.append({"role": "assistant", "content": out})
        return out

    if prompt is not None:
        print(ask(prompt))
        return 0
    def refuse(text: str) -> str | None:
        return "error: one image per conversation is supported (given with --image)" if image_count(text) else None

    return repl(f"{Path(model_dir).name} looking at {images[0]}: {HELP}", lambda text: print(ask(text)), history,
                keep=1 if system else 0, refuse=refuse)


def open_vl(model_dir: Path, image: str):
    """load_vl with its one-line error or conversion note on stderr: (model, tok, pixels), or None on error."""
    try:
        model, tok, pixels, note = load_vl(model_dir, image)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if note:
        print(f"note: {image}: {note}", file=sys.stderr)
    return model, tok, pixels


def vl_generate_main(model_dir: Path, images: list[str], prompts: list[str], max_new_tokens: int, temperature: float,
                     seed: int) -> int:
    """`family generate --image PATH TEXT`: continue `<image> TEXT` as raw text (no chat template)."""
    from models.vision import IMAGE_TOKEN_TEXT, expand_image_tokens

    if len(images) > 1:
        print(f"error: {len(images)} images given ({', '.join(images)}); one is supported", file=sys.stderr)
        return 2
    opened = open_vl(Path(model_dir), images[0])
    if opened is None:
        return 2
    model, tok, pixels = opened
    generator = torch.Generator().manual_seed(seed)
    for i, p in enumerate(prompts):
        ids = tok.encode(expand_image_tokens(f"{IMAGE_TOKEN_TEXT}\n{p}", model.vcfg.image_tokens))
        with torch.inference_mode():
            model.set_images(model.image_features(pixels[None]))
            try:
                new = list(stream_generate(model.decoder, ids, max_new_tokens, temperature=temperature,
                                           top_p=0.95 if temperature > 0 else None, stop_ids=(tok.eot_id, tok.im_end_id),
                                           generator=generator))
            finally:
                model.set_images(None)
        print(p + tok.decode(new, skip_special_tokens=True))
        if len(prompts) > 1 and i + 1 < len(prompts):
            print("-" * 40)
    return 0
