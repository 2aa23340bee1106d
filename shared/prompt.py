"""Prompt building and answer post-processing for the generator: pure functions, no model.

Prompt wording, chosen on SmolLM2-135M-Instruct with greedy decoding. Each of six capital
questions (France/Paris, Japan/Tokyo, Kenya/Nairobi, Peru/Lima, Canada/Ottawa, Egypt/Cairo) got
three real corpus summaries with the right one at position 1, 2 and 3: 18 cases with unrelated
countries as distractors, 18 with neighbours (Germany/Belgium for France, ...) whose passages
name their own capitals. Answer contains the capital, unrelated / neighbours:
  A. system: "answer using only the numbered passages, one short sentence, cite like [1],
     else say I don't know"; user: "Passages: ... Question: ..."          15/18  17/18
  B. as A, the question both before and after the passages, "Answer:" cue  13/18  -
     (often "Egypt is the capital of Egypt.")
  C. no system message, all instructions in the user turn                 15/18  13/18
  D. system also says "ignore passages about other things"; no headings   15/18  15/18
  E. as A, but "end it with the number of the passage you used in square
     brackets" instead of the literal example "[1]"                        15/18  17/18
A and E give the same answers there (misses: Canada, whose capital ends a long passage), but
on three short passages (France/Germany/Japan, all 6 orders x 3 questions) A sometimes copies
its example marker "[1]" whatever the passage, e.g. "Paris. [1]" with France as [2]; E wrote
no wrong marker and answered 18/18. E is kept (``SYSTEM_PROMPT``). No wording made the model say
``NO_ANSWER`` (asked for Chile's capital with France/Japan/Kenya passages it answers "Santiago",
as shared/DATA.md reports); the instruction stays so a fine-tuned generator learns the
convention, and ``parse_citations`` attributes answers that carry no marker.

Passage order, chosen later on questions of other shapes: the model reads the passage next to
the question best, so passages are numbered by rank but shown best last ("[3] ... [2] ... [1]
... Question: ..."). Answer contains of the packaged generator, hybrid top 3, greedy, best
first (the order before) / best last (bench/handwritten.py, bench/trust.py):
  bench/data/handwritten.jsonl, 50 answerable (where the order was found)   .28 / .46
  bench/data/handwritten-heldout.jsonl, 40 answerable (written afterwards)  .35 / .55
  capitals, test split (37)                                                   .59 / .76
  FanOutQA sub-questions, test split (75)                                     .09 / .12
  FanOutQA whose answer is in the evidence, test split (7)                    .57 / .71
On "What is X?" questions the model sometimes only says "The answer to this question is:"
in either order (a spot check: 7 of 20 best last, 5 of 20 best first); trust withholds those.
"""

from __future__ import annotations

import re
import unicodedata

from shared.schemas import Citation, Hit

NO_ANSWER = "I don't know."
# A generator fine-tuned with restated answers (``services/trainer/generator.py``: ``restate``)
# writes a sentence first and its short answer on a line of its own after this cue; the answer
# is that line ("Freddie Mercury was Queen's lead vocalist.\nAnswer: Freddie Mercury [2]").
ANSWER_CUE = "Answer:"

SYSTEM_PROMPT = (
    "You answer questions using only the numbered passages you are given. "
    "Answer in one short sentence and end it with the number of the passage you used in "
    "square brackets. "
    f'If the passages do not contain the answer, say exactly "{NO_ANSWER}"'
)

# Function words never count as evidence that an answer came from a passage.
_STOPWORDS_TEXT = """
    a about above after again against all also am an and any are as at be because been
    before being below between both but by can could did do does doing down during each
    few for from further had has have having he her here hers him his how i if in into
    is it its itself just me more most my no nor not now of off on once only or other
    our ours out over own same she should so some such than that the their theirs them
    then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours passage passages
    answer question
"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())

# Number words read as digits, so "12 edges" in an answer and "twelve edges" in a passage share
# a word ("one" stays a word: it is more often a pronoun than a count).
_NUMBERS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13",
    "fourteen": "14", "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18",
    "nineteen": "19", "twenty": "20", "thirty": "30", "forty": "40", "fifty": "50",
    "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
}
_CUED = re.compile(rf"^[ \t]*{re.escape(ANSWER_CUE)}(.*)$", re.MULTILINE)
_MARKER = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_WORD = re.compile(r"\w+")
_POLAR = re.compile(r"\W*(?:yes|no)\b", re.IGNORECASE)  # a yes/no answer's first word
_LAST_SPACE = re.compile(r"\s\S*$")
# A sentence ends at . ! or ? (plus closing quotes/brackets and trailing citation markers)
# followed by whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)]*(?:\s*\[\d+(?:\s*,\s*\d+)*\])*(?=\s|$)")
# A period that ends an initial or a common abbreviation ("U.S.", "George W. Bush", "St.
# Louis", "c. 1500") ends no sentence.
_ABBREVIATION = re.compile(r"(?:^|[\s.(])(?:[A-Z]|St|Mt|Dr|Mr|Mrs|Ms|Jr|Sr|No|vs|c|ca)\.$")
# Words that stand for a summary's subject in its own sentences ("He was the son of Darius").
PRONOUNS = frozenset({"he", "she", "it", "its", "his", "her", "him", "they", "their", "them"})
# Cite the best-overlapping passage only if it holds at least this share of the answer's
# content words; below it the answer is more likely the model's own words than a quote.
MIN_OVERLAP = 0.5


def truncate_text(text: str, max_chars: int) -> str:
    """``text`` stripped and cut to at most ``max_chars`` characters at a word boundary.

    A single word longer than ``max_chars`` is cut mid-word. Raises ``ValueError`` if
    ``max_chars < 1``.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer, but is {max_chars}")
    text = text.strip()
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    if not text[max_chars].isspace():  # the cut fell inside a word: drop that word
        last_space = _LAST_SPACE.search(cut)
        if last_space is not None and cut[: last_space.start()].strip():
            cut = cut[: last_space.start()]
    return cut.rstrip()


def cut_hit(hit: Hit, max_chars: int) -> Hit:
    """``hit`` with its text cut as ``truncate_text`` cuts it: the passage as a prompt shows
    it (what the generator can see, cite and be trained to answer from)."""
    return hit.model_copy(update={"text": truncate_text(hit.text, max_chars)})


def shown(passages: list[Hit], chars: list[int]) -> list[Hit]:
    """The passages as a prompt held them, from ``GenerateResult.shown_chars``: the first
    ``len(chars)`` of ``passages``, each text cut to its count (``truncate_text`` cuts a
    stripped text's prefix). What an answer's trust is measured on: the generator saw no more."""
    return [hit.model_copy(update={"text": hit.text.strip()[:n]})
            for hit, n in zip(passages, chars, strict=False)]


def format_passages(passages: list[Hit], max_chars: int) -> str:
    """Passages as ``"[n] Title\\ntext"`` blocks separated by blank lines, numbered by rank
    from 1 and shown best last (``[3] ...``, ``[2] ...``, ``[1] ...``): the passage most
    likely to answer sits next to the question (see the module docstring).

    Each text is cut to ``max_chars`` characters (see ``truncate_text``); titles are kept whole.
    """
    blocks = [f"[{n}] {hit.title.strip()}\n{truncate_text(hit.text, max_chars)}"
              for n, hit in enumerate(passages, start=1)]
    return "\n\n".join(reversed(blocks))


def build_messages(question: str, passages: list[Hit], max_chars: int) -> list[dict[str, str]]:
    """Chat messages (system, user) for ``tokenizer.apply_chat_template``."""
    user = f"Passages:\n{format_passages(passages, max_chars)}\n\nQuestion: {question.strip()}"
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": user},
    ]


def clean_answer(text: str, *, truncated: bool = True, cued: bool = True) -> str:
    """The answer stripped; if ``truncated``, without a trailing unfinished sentence.

    ``truncated`` says generation stopped at the token limit rather than at end-of-sequence.
    Only then is a trailing fragment (text after the last ``.``, ``!`` or ``?``) dropped, and
    only when a complete sentence precedes it, so an answer is never emptied: "Paris is the
    capital. It lies on the" -> "Paris is the capital."; "The capital is" stays as it is.

    ``cued``: the text may be a restated answer (a generator fine-tuned with ``restate``), so
    one with a line that starts with ``ANSWER_CUE`` is answered by what follows the first such
    cue (``after_cue``), truncated or not: "Paris is France's capital.\nAnswer: Paris [1]" ->
    "Paris [1]". A cue with nothing after it leaves the text as it is. Serving passes its
    generator's own flag, as its streaming does (``streaming.streamable``), so what streams
    begins the final answer; with ``cued=False`` an "Answer:" line is text like any other.
    The default keeps the offline evaluation (``services.evaluation.qa``), which does not know
    how its model was trained, reading restated answers.
    """
    text = text.strip()
    if cued and (answer := after_cue(text)):
        return answer
    if not truncated:
        return text
    ends = list(_SENTENCE_END.finditer(text))
    if not ends:
        return text
    return text[: ends[-1].end()].rstrip()


def after_cue(text: str) -> str | None:
    """What follows the first line of ``text`` that starts with ``ANSWER_CUE``, to that line's
    end and stripped ("" for a bare cue); ``None`` where no line starts with it.

    The first, not the last: text generated after that line cannot change it, so a streamed
    answer can be sent as it grows (``streaming.streamable``) and still be the final one."""
    cue = _CUED.search(text)
    return cue.group(1).strip() if cue else None


def is_no_answer(answer: str) -> bool:
    """True for an empty answer or one that starts with ``NO_ANSWER`` (any case)."""
    key = NO_ANSWER.rstrip(".").lower()
    return not answer.strip() or answer.strip().lower().replace("’", "'").startswith(key)


def parse_citations(answer: str, passages: list[Hit], *, question: str = "") -> list[Citation]:
    """Passages the answer cites, as ``Citation`` records with 1-based passage numbers.

    Explicit markers ``[n]`` / ``[n, m]`` win: numbers outside ``1..len(passages)`` are
    ignored; the rest are kept once each, in order of first appearance. With no valid marker,
    the answer is attributed by word overlap: its content words (``\\w+`` tokens, lower-cased,
    minus stopwords and words of ``question``) are looked up in each passage's title and text,
    and the passage holding the largest share is cited if that share is at least
    ``MIN_OVERLAP`` (ties: the passage whose title shares more words with the answer, then the
    earlier passage). No citation for a ``NO_ANSWER`` or empty answer.
    """
    if is_no_answer(answer) or not passages:
        return []
    numbers: list[int] = []
    for match in _MARKER.finditer(answer):
        for part in match.group(1).split(","):
            n = int(part)
            if 1 <= n <= len(passages) and n not in numbers:
                numbers.append(n)
    if not numbers:
        best = _best_overlap(answer, passages, question)
        numbers = [] if best is None else [best]
    return [
        Citation(passage=n, doc_id=passages[n - 1].doc_id, title=passages[n - 1].title)
        for n in numbers
    ]


def support(answer: str, passages: list[Hit], *, question: str = "",
            by_sentence: bool = True) -> float | None:
    """How much of ``answer`` the passages back: the share of its content words (as
    ``parse_citations`` counts them: ``\\w+`` tokens, lower-cased, without citation markers,
    stopwords and words of ``question``) that occur in the passages' titles and texts.

    ``by_sentence`` (the default) counts a word only where the passage speaks of the question:
    in a sentence that shares a word with the question (``_stems``; a sentence with a
    pronoun, ``PRONOUNS``, also counts its passage's title as said), or in the title of a
    passage with such a sentence. "Banaba" for "What is the capital of Kiribati?" over
    "Kiribati [...] comprises 32 atolls and [...] one remote raised coral island, Banaba." is
    0.0 (no sentence naming Banaba says "capital" or "Kiribati"), where ``by_sentence=False``,
    the words anywhere in the passages, says 1.0. A question with no content word falls back
    to the words anywhere.

    1.0 when every such word is there; 0.0 when none is, or when the answer has no content
    word at all (it only restates the question, e.g. "Denmark is the capital of Denmark.").
    An answer that starts with "yes" or "no" answers the question's own claim, so there the
    question's words count too ("No." to "Is Paris the capital of France?" over a passage on
    Paris and France: 1.0). None for a ``NO_ANSWER`` or empty answer: there is nothing to
    back. A lexical check: an answer that paraphrases its passage scores lower than one that
    quotes it.
    """
    if is_no_answer(answer):
        return None
    words, question_words = _answer_words(answer), _words(question)
    asked = question_words - STOPWORDS
    polar = _POLAR.match(answer)
    content = (words | asked) - {"yes"} if polar else words - question_words
    if not content:
        return 0.0
    if not by_sentence or not asked:
        evidence = set().union(*(_words(f"{hit.title} {hit.text}") for hit in passages))
        return len(content & evidence) / len(content)
    evidence: set[str] = set()
    asked_stems = _stems(asked)
    for hit in passages:
        title = _words(hit.title)
        # a pronoun in a summary's sentence stands for its subject, the passage's title
        said = [w | title if w & PRONOUNS else w for w in map(_words, _sentences(hit.text))]
        on_topic = [w for w in said if _stems(w) & asked_stems]
        evidence = evidence.union(*on_topic, title if on_topic else ())
    return len(content & evidence) / len(content)


def withhold(answer: str, passages: list[Hit], *, question: str, min_trust: float,
             by_sentence: bool = True) -> tuple[str, float | None, str | None]:
    """``(answer, trust, draft)``: the answer to give, its ``support`` and, when that is below
    ``min_trust``, ``NO_ANSWER`` in its place with the generator's words as ``draft``
    (else ``draft`` is None). The QA front and the offline evaluation both apply it;
    ``by_sentence`` is ``support``'s."""
    trust = support(answer, passages, question=question, by_sentence=by_sentence)
    if trust is not None and trust < min_trust:
        return NO_ANSWER, trust, answer
    return answer, trust, None


def _words(text: str) -> set[str]:
    """Lower-cased ``\\w+`` tokens without accents ("San José" and "San Jose" share words),
    number words as digits ("twelve" is "12")."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text)
                     if not unicodedata.combining(c))
    return {_NUMBERS.get(w, w) for w in (w.lower() for w in _WORD.findall(folded))}


def _sentences(text: str) -> list[str]:
    """``text`` cut after each ``_SENTENCE_END`` but an abbreviation's (``_ABBREVIATION``: "the
    U.S. Congress" stays whole); a trailing fragment is a sentence too."""
    cuts = [0, *(m.end() for m in _SENTENCE_END.finditer(text)
                 if not _ABBREVIATION.search(text, 0, m.start() + 1)), len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False) if text[a:b].strip()]


def _stems(words: set[str]) -> set[str]:
    """``words`` by their first five letters, as sentences and questions are compared: so that
    "capital" meets "capitals" and "bordered" meets "borders"."""
    return {w[:5] for w in words}


def _answer_words(answer: str) -> set[str]:
    """The answer's words that can be evidence: without citation markers and stopwords."""
    return _words(_MARKER.sub(" ", answer)) - STOPWORDS


def _best_overlap(answer: str, passages: list[Hit], question: str) -> int | None:
    words = _answer_words(answer)
    content = words - _words(question)
    if not content:
        return None
    best_n, best_key = None, (0.0, 0)
    for n, hit in enumerate(passages, start=1):
        share = len(content & _words(f"{hit.title} {hit.text}")) / len(content)
        # Ties on the answer's own words ("Canada is a country in North America." matches the
        # Canada and the United States passages alike) go to the passage whose title the
        # answer names.
        key = (share, len(words & _words(hit.title)))
        if key > best_key:
            best_n, best_key = n, key
    return best_n if best_key[0] >= MIN_OVERLAP else None
