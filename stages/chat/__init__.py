"""Supporting modules of the instruct stage (not stages themselves); SFT, DPO, GRPO and evaluation
import them too.

importers.py  the formats people have (TRL, alpaca, sharegpt, GSM8K, HH-RLHF) -> chat/prefs/prompts rows
verifiers.py  reward checks of a completion against a reference answer: exact, exact_case, numeric
docqa.py      closed-book question/answer pairs about the modules, functions and classes in pydoc text
"""
