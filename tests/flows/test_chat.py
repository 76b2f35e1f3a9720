"""`family chat`: one-shot --prompt mode prints only the answer; the interactive loop keeps history,
resets it on /reset and ends cleanly on EOF; a bad model directory is one line and exit code 2."""
from __future__ import annotations

import builtins

from flows import chat
from models.gpt import GPT
from stages.chat.evaluate import generate_answers
from tests.stages.test_sft import tiny_model_dir, tiny_tokenizer


def test_prompt_mode_prints_only_the_greedy_answer(tmp_path, capsys):
    tok = tiny_tokenizer()
    model_dir = tiny_model_dir(tmp_path / "m", tok)
    code = chat.chat_main(model_dir, "opposite of hot?", max_new_tokens=8, temperature=0.0, system="Be brief.")
    out = capsys.readouterr().out
    expected = generate_answers(GPT.from_pretrained(model_dir), tok,
                                [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "opposite of hot?"}]],
                                max_new_tokens=8)[0]
    assert code == 0 and out == expected + "\n"


def test_interactive_keeps_history_resets_and_ends_on_eof(tmp_path, monkeypatch, capsys):
    model_dir = tiny_model_dir(tmp_path / "m", tiny_tokenizer())
    lines = iter(["first", "second", "/reset", "third"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    seen = []

    def fake_reply(model, tok, messages, max_new_tokens, temperature, generator):
        seen.append([m["content"] for m in messages])
        return iter(["ok", "!"])

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(chat, "reply", fake_reply)
    assert chat.chat_main(model_dir, None, max_new_tokens=8, temperature=0.7, system="sys") == 0
    assert seen == [["sys", "first"], ["sys", "first", "ok!", "second"], ["sys", "third"]]
    assert capsys.readouterr().out.count("ok!\n") == 3


def test_missing_model_directory_is_exit_code_2(tmp_path, capsys):
    assert chat.chat_main(tmp_path / "nope", "hi", 8, 0.0, None) == 2
    err = capsys.readouterr().err
    assert "not a model directory" in err and "config.json" in err and err.count("\n") == 1


def test_fit_context_drops_oldest_turns_but_keeps_the_system_message():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "sys"}] + [
        {"role": r, "content": f"opposite of {w}?"} for w in ("hot", "up", "big") for r in ("user", "assistant")][:-1]
    full = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    last = tok.encode(tok.apply_chat_template([messages[0], messages[-1]], add_generation_prompt=True))
    assert chat.fit_context(tok, messages, budget=len(full)) == full
    assert chat.fit_context(tok, messages, budget=len(last)) == last


def test_stream_text_holds_back_a_partial_character():
    tok = tiny_tokenizer()
    ids = tok.encode("né!")  # "é" is two bytes: two byte-level tokens unless merged
    pieces = list(chat.stream_text(tok, iter(ids)))
    assert "".join(pieces) == "né!" and all("\ufffd" not in p for p in pieces)


def test_a_damaged_published_model_is_one_line_not_a_traceback(tmp_path, capsys):
    """Truncated weights of a published model: `family chat` and `family generate` name the file and
    what to do, in one line, exit code 2 (before, safetensors' SafetensorError came as a traceback)."""
    import shutil

    from flows.cli import main as cli
    from storage.artifacts import ArtifactStore
    from storage.home import Home

    home = Home(tmp_path / "home").ensure()
    store = ArtifactStore(home)
    with store.lease("sft", "fp") as work:
        shutil.copytree(tiny_model_dir(tmp_path / "m", tiny_tokenizer()), work / "out" / "sft")
        pub = store.publish("sft", "fp", work / "out", {"sft": {}}, config={}, result={}, upstream={})
    weights = pub.dir / "sft" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for argv in (["chat", "--model", "sft", "--prompt", "hi"], ["generate", "--model", "sft", "hi"]):
        capsys.readouterr()
        assert cli([*argv, "--home", str(home.root)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(weights) in err and "family run" in err and "Traceback" not in err
