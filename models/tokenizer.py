"""The family's tokenizer: a byte-level BPE `tokenizers.Tokenizer` plus the ChatML chat template.

Special tokens have fixed ids 0..7 in every tokenizer the family trains (SPECIAL_TOKENS order):
<|endoftext|> (0) ends every pretraining document and pads; <|im_start|>/<|im_end|> frame chat turns
(Qwen-style ChatML); <think>/</think> wrap reasoning; the vision tokens are reserved for the VL model.

The chat template is kept twice: as Jinja (CHAT_TEMPLATE, saved in tokenizer_config.json for HF
`apply_chat_template`) and as Python (`Tokenizer.apply_chat_template`); a test checks they agree.

    tok = Tokenizer.load(dir)
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK = "<think>"
THINK_END = "</think>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END, THINK, THINK_END, VISION_START, VISION_END, IMAGE_PAD)

# Qwen2's pre-tokenization regex (its tokenizer.json): contractions, letters with at most one leading
# non-letter, single digits, punctuation runs, newlines, spaces. llama.cpp knows it as "qwen2" and
# Ollama's qwen3 engine always applies it, so a GGUF of our models tokenizes as we do.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class Tokenizer:
    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.special_ids: dict[str, int] = ids
        self.eot_id = ids[EOT]
        self.pad_id = ids[EOT]
        self.im_start_id = ids[IM_START]
        self.im_end_id = ids[IM_END]
        self.think_id = ids[THINK]
        self.think_end_id = ids[THINK_END]
        self.image_pad_id = ids[IMAGE_PAD]

    @classmethod
    def load(cls, directory: str | Path) -> "Tokenizer":
        return cls(HFTokenizer.from_file(str(Path(directory) / "tokenizer.json")))

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """ChatML, exactly as CHAT_TEMPLATE renders it."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def encode_chat(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask): the rendered conversation and, per token, whether it is the model's
        to predict: the content of assistant turns and their closing <|im_end|>.

        The whole conversation is encoded at once (so ids equal encode(apply_chat_template(...)))
        and a token is an assistant token when its characters overlap an assistant span; a token
        that straddles the newline after the role belongs to the assistant.
        """
        spans: list[tuple[int, int]] = []  # [start, end) characters the assistant writes
        pos = 0
        for m in messages:
            head = f"{IM_START}{m['role']}\n"
            start = pos + len(head)
            end = start + len(m["content"]) + len(IM_END)
            if m["role"] == "assistant":
                spans.append((start, end))
            pos = end + 1  # the "\n" after <|im_end|>
        enc = self.tok.encode(self.apply_chat_template(messages), add_special_tokens=False)
        mask = [any(s < b and a < e for s, e in spans) for a, b in enc.offsets]
        return enc.ids, mask

    def save(self, directory: str | Path, eos_token: str = EOT, model_max_length: int = 1 << 30) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF AutoTokenizer).

        eos_token: <|endoftext|> for a base model, <|im_end|> for a chat model (generation stops there).
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / "tokenizer.json"))
        extra = [t for t in SPECIAL_TOKENS if t != EOT]
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": eos_token,
            "pad_token": EOT,
            "unk_token": None,
            "additional_special_tokens": extra,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {
                str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False, "special": True}
                for t, i in self.special_ids.items()
            },
        }
        (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        special_map = {"eos_token": eos_token, "pad_token": EOT, "additional_special_tokens": extra}
        (d / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
