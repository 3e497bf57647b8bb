"""Deterministic real-world texts for the exactness tests.

* ENGLISH: multi-paragraph prose from CPython's own documentation (``pydoc_data.topics``,
  the language reference shipped with every Python), with its code samples and indentation.
* CODE: Python source of a stdlib module (whitespace runs, digits, punctuation, newlines).
* MIXED: prose written for these tests, with accents, CJK, emoji, combining marks, RTL text,
  non-breaking and ideographic spaces, long digit runs, tabs, CRLF and Llama 3 special tokens.
* WHITESPACE: every short run of mixed whitespace between words (generated).
"""

from __future__ import annotations

import inspect
import json.decoder
from pydoc_data.topics import topics


def english(chars: int) -> str:
    out, total = [], 0
    for name in sorted(topics):
        out.append(topics[name])
        total += len(topics[name])
        if total >= chars:
            break
    return "\n\n".join(out)[:chars]


ENGLISH = english(6000)
CODE = inspect.getsource(json.decoder)[:4000]

MIXED = (
    "Release notes, spring edition.\n\n"
    "The café on Rue de l'Église now opens at 07:30; naïve coöperation is encouraged. "
    "Straße, smörgåsbord and façade all survive the round trip.\r\n"
    "東京の天気は晴れです。明日も晴れるでしょう。 Mixed 中文 and English words here.\n"
    "Emoji: 😀😀 🚀🚀🚀 👩\u200d💻 and flags 🇫🇷🇩🇪 sit next to words.\n"
    "Combining marks: e\u0301 a\u0308 n\u0303 spread over several code points.\n"
    "Arabic: مرحبا بالعالم, Hebrew: שלום עולם, Greek: Καλημέρα κόσμε.\n"
    "Numbers: 1234567890 3.14159 -42 1e10 0x1F 2024-07-26 and 100,000,000 units.\n"
    "Spaces:\u00a0non-breaking,\u3000ideographic,\u2009thin, and zero\u200bwidth.\n"
    "Tabs\tand\t\tdouble tabs,    four spaces,        eight spaces.\n\n\n\n"
    "    indented line\n        deeper line\n\t\ttabbed line   \n"
    "Contractions: it's, we're, they've, I'm, you'll, he'd, DON'T, Can'T.\n"
    "Punctuation runs: !!! ??? ... --- *** ((( ))) {{ }} [[ ]] <<< >>> |||.\n"
    "Special tokens in text: <|eot_id|>after eot <|start_header_id|>user<|end_header_id|>\n\n"
    "pipes |> and <| that are not tokens, <|not_a_token|> either.\n"
    "End of the mixed paragraph with trailing spaces   "
)

CHAT_LIKE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
    "You answer questions about the shipping manual.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n顧客の荷物はどこですか？<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nIt left the depot at 09:15.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd the second parcel?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _whitespace_zoo() -> str:
    """Every run of one to three whitespace characters (of seven kinds) between words and
    punctuation: the cases where pre-tokenizer boundaries inside whitespace are subtle."""
    kinds = [" ", "\t", "\n", "\r", "\u3000", "\u00a0", "\u2028"]
    runs = [a + b + c for a in kinds for b in ["", *kinds] for c in ["", *kinds]]
    words = ["word", "x", "42", "?!", "é", "<|eot_id|>"]
    return "".join(words[i % len(words)] + run for i, run in enumerate(runs)) + "end"


WHITESPACE = _whitespace_zoo()

ALL = {
    "english": ENGLISH,
    "code": CODE,
    "mixed": MIXED,
    "chat": CHAT_LIKE,
    "whitespace": WHITESPACE,
}
