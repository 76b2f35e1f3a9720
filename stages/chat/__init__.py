"""Supporting modules of the instruct stage (not stages themselves); SFT, DPO, GRPO and evaluation
import them too.

importers.py  the formats people have (TRL, alpaca, sharegpt, GSM8K, HH-RLHF) -> chat/prefs/prompts rows
verifiers.py  reward checks of a completion against a reference answer: exact, exact_case, numeric
docqa.py      closed-book question/answer pairs about the modules, functions and classes in pydoc text
worked.py     worked replies (column arithmetic, letter tallies) and the slips that make hard rejected replies
decontam.py   the splits' shared keys and the decontamination of every held-out example against every train set
preference.py pairs, batches and per-kind accuracy for the reward model and DPO
evaluate.py   greedy held-out evaluation of chat models, few-shot prompts for the base model
lm_eval_check.py  EleutherAI's lm-evaluation-harness re-grading our answers and re-scoring our bpb
"""
