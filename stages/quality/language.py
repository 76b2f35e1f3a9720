"""Language filter: keep documents in the wanted languages whose language-ID score reaches a threshold.

FineWeb and DCLM keep English at fastText score >= 0.65 (datatrove LanguageFilter); we use the
language and probability the extract stage stored (py3langid, normalised probabilities). A document
without a language (imported from elsewhere) is identified here with the same py3langid model.
"""
from __future__ import annotations

from stages.quality import Verdict


class LanguageFilter:
    name = "language"

    def __init__(self, languages: tuple[str, ...] = ("en",), min_score: float = 0.65):
        self.languages = frozenset(languages)  # empty: any language
        self.min_score = min_score
        self._identifier = None

    def identify(self, text: str) -> tuple[str, float]:
        if self._identifier is None:  # loading the model costs ~0.5 s: only when a document needs it
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(text)
        return lang, float(score)

    def filter(self, doc: dict) -> Verdict:
        if not doc.get("lang"):
            doc["lang"], doc["lang_score"] = self.identify(doc["text"])
        lang, score = doc["lang"], doc.get("lang_score") or 0.0
        if self.languages and lang not in self.languages:
            return False, f"language:{lang}", f"{lang} {score:.2f}"
        if self.min_score and score < self.min_score:
            return False, "language:low_score", f"{lang} {score:.2f} < {self.min_score}"
        return True
