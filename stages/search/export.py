"""sentence-transformers folders for the embedder and the reranker, written by hand (this module does
not import sentence-transformers, a test-only dependency).

Both start from the HF Qwen3 export (models/hf_export.py) and differ only in small files:

Embedder (`SentenceTransformer(dir)`): modules.json = Transformer -> 1_Pooling (last token, the
prompt included) -> 2_Normalize; config_sentence_transformers.json holds the query prompt (our
instruction; documents get none) and cosine similarity; tokenizer.json's post-processor appends
<|endoftext|> to every text, which is where last-token pooling reads. sentence_bert_config.json names
the plain text modality, so sentence-transformers >= 5.4 does not render texts through a chat
template, and the files stay readable by older versions (which ignore the key).

Reranker (`CrossEncoder(dir)`, sentence-transformers >= 5.4): modules.json = Transformer
(text-generation) -> 1_LogitScore(yes, no) with the activation Identity, so predict() returns
logit_yes - logit_no, our score; tokenizer.json's pair template is PREFIX $A MIDDLE $B SUFFIX
(PREFIX $B MIDDLE $A SUFFIX for a passage-first prompt) with the reranker's own token pieces
(stages/search/encode.py), so a (query, passage) pair is tokenized exactly as we do it. `seq-cls/`
is the same model as Qwen3ForSequenceClassification with one label whose weight is lm_head[yes] -
lm_head[no] (the form of tomaarsen/Qwen3-Reranker-0.6B-seq-cls), for sentence-transformers before
5.4 and for servers that read sequence classifiers: its score is the same number. The chat
template is left out of both tokenizer configs for the same reason as above.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from models.gpt import GPT
from models.hf_export import export_hf
from models.tokenizer import EOT, Tokenizer
from stages.search.encode import RerankPrompt

MIN_ST = "5.4.0"  # the first sentence-transformers that reads a CausalLM yes/no reranker


def _special(name: str, ids: list[int], tok: Tokenizer) -> dict:
    return {"id": name, "ids": ids, "tokens": [tok.tok.id_to_token(i) for i in ids]}


def _piece(name: str) -> dict:
    return {"SpecialToken": {"id": name, "type_id": 0}}


def _seq(name: str, type_id: int = 0) -> dict:
    return {"Sequence": {"id": name, "type_id": type_id}}


def set_post_processor(out: Path, single: list[dict], pair: list[dict], special: dict[str, dict]) -> None:
    """Rewrite out/tokenizer.json's post-processor as a TemplateProcessing (after byte-level offsets)."""
    path = out / "tokenizer.json"
    doc = json.loads(path.read_text())
    template = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}
    doc["post_processor"] = template
    path.write_text(json.dumps(doc, ensure_ascii=False))


def _tokenizer_config(out: Path, max_seq_length: int, padding_side: str) -> None:
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.pop("chat_template", None)
    cfg.update(model_max_length=max_seq_length, padding_side=padding_side)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def _write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def export_embedder(model: GPT, tokenizer_dir: Path, out: Path, instruction: str, max_seq_length: int) -> Path:
    """The sentence-transformers folder of an embedder (see the module docstring)."""
    if out.exists():
        shutil.rmtree(out)
    export_hf(model, tokenizer_dir, out)
    tok = Tokenizer.load(tokenizer_dir)
    eos = {EOT: _special(EOT, [tok.eot_id], tok)}
    set_post_processor(out, [_seq("A"), _piece(EOT)], [_seq("A"), _piece(EOT), _seq("B", 1), _piece(EOT)], eos)
    _tokenizer_config(out, max_seq_length, "right")
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2) + "\n")
    _write_json(out / "sentence_bert_config.json", {
        "max_seq_length": max_seq_length, "do_lower_case": False, "transformer_task": "feature-extraction",
        "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        "module_output_name": "token_embeddings"})
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.cfg.d_model, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True})
    (out / "2_Normalize").mkdir(exist_ok=True)
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer", "prompts": {"query": instruction, "document": ""},
        "default_prompt_name": None, "similarity_fn_name": "cosine",
        "__version__": {"sentence_transformers": MIN_ST}})
    return out


def export_reranker(model: GPT, tokenizer_dir: Path, out: Path, prompt: RerankPrompt, max_seq_length: int) -> Path:
    """The sentence-transformers CrossEncoder folder of a reranker, and its seq-cls/ fallback."""
    if out.exists():
        shutil.rmtree(out)
    export_hf(model, tokenizer_dir, out)
    tok = prompt.tok
    pieces = {"PREFIX": prompt.prefix, "MIDDLE": prompt.middle, "SUFFIX": prompt.suffix}
    special = {k: _special(k, v, tok) for k, v in pieces.items()}
    first, second = (_seq("B", 1), _seq("A")) if prompt.passage_first else (_seq("A"), _seq("B", 1))
    pair = [_piece("PREFIX"), first, _piece("MIDDLE"), second, _piece("SUFFIX")]
    set_post_processor(out, [_piece("PREFIX"), _seq("A"), _piece("SUFFIX")], pair, special)
    _tokenizer_config(out, max_seq_length, "left")
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_LogitScore",
         "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore"},
    ], indent=2) + "\n")
    _write_json(out / "sentence_bert_config.json", {
        "max_seq_length": max_seq_length, "transformer_task": "text-generation",
        "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
        "module_output_name": "causal_logits"})
    _write_json(out / "1_LogitScore" / "config.json", {
        "true_token_id": prompt.yes_id, "false_token_id": prompt.no_id, "module_input_name": "causal_logits"})
    st = {"model_type": "CrossEncoder", "activation_fn": "torch.nn.modules.linear.Identity", "prompts": {},
          "default_prompt_name": None, "__version__": {"sentence_transformers": MIN_ST}}
    _write_json(out / "config_sentence_transformers.json", st)

    # the fallback: Qwen3ForSequenceClassification, score = (lm_head[yes] - lm_head[no]) . h_last
    seq = out / "seq-cls"
    seq.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (out / name).is_file():
            shutil.copy2(out / name, seq / name)
    state = load_file(str(out / "model.safetensors"))
    head = state.pop("lm_head.weight", state["model.embed_tokens.weight"])
    state["score.weight"] = (head[prompt.yes_id] - head[prompt.no_id])[None].contiguous()  # (1, d)
    save_file(state, str(seq / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.update(architectures=["Qwen3ForSequenceClassification"], num_labels=1, id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, tie_word_embeddings=False, pad_token_id=tok.pad_id,
                  sentence_transformers={"activation_fn": st["activation_fn"]})
    _write_json(seq / "config.json", config)
    _write_json(seq / "sentence_bert_config.json", {"max_seq_length": max_seq_length})
    _write_json(seq / "config_sentence_transformers.json", {**st, "prompts": {}})
    return out
