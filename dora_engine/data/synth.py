"""The embedded default dataset: a controlled mixture shift with a known oracle (docs/design.md section 3).

Every prompt asks how to do one of a small set of everyday tasks ("How do I bake bread?"). Responses
come from one *golden* source (the target Q0) and several *shifted* sources (Q1..Qm), modelled on the
artefacts the paper attributes to synthetic data:

* ``golden``     -- concise, on topic: three of the task's steps in order.
* ``verbose``    -- the golden content wrapped in generic filler sentences (too long).
* ``off_topic``  -- a well-formed answer about a different task.
* ``repetitive`` -- one step of the task repeated over and over.

The text is real English over a small vocabulary (a few hundred words), so real tokenizers and
classifiers apply and a tiny model with a word-level tokenizer can learn it.

Public API (stable):

``oracle_reward(prompt, response) -> float``
    Deterministic, pure-Python reward usable on any text, including free-form generations::

        reward = precision + coverage - repetition - length_excess

    with words = lowercase alphabetic tokens, content = words outside a stop-word list and R the
    relevant words of the prompt (its task's name and all its steps when the prompt names a known
    task, otherwise the prompt's own content words):
    ``precision`` = fraction of content words in R; ``coverage`` = min(1, |distinct content ∩ R| / 6);
    ``repetition`` = 1 - distinct word bigrams / word bigrams; ``length_excess`` =
    max(0, #words - 40) / 40. An empty response gets 0 - 0 - 0 - 0 = 0. Golden responses score about
    1.7-2.0, every shifted source clearly less on average.
``synth_records(num_prompts=200, k=4, golden_per_prompt=1, mix=None, label_noise=0.0, length_bias=0.0, seed=0,
golden_fraction=1.0, split="all")``
    ``list[Record]``: ``num_prompts`` records of K responses, ``golden_per_prompt`` of them golden (in the
    first ``golden_fraction`` of the records; the rest have shifted responses only) and
    the other slots drawn independently from ``mix`` (shifted source -> weight; default uniform over
    ``SHIFTED_SOURCES``), the response order shuffled, scores = ``oracle_reward`` (plus
    ``length_bias · #words / 40`` when ``length_bias`` > 0: a misspecified reward model with the
    verbosity bias of real ones, while evaluation keeps the oracle), then a fraction ``label_noise``
    of records corrupted as by ``dora_engine.data.corrupt.corrupt_records``. ``meta`` holds the task
    name. Prompts cycle through the (task, template) pairs of ``split`` before any repeats: ``all`` has
    the 32 × 14 = 448 pairs, ``train`` and ``eval`` each half of them, with no prompt text in common
    (``prompt_pairs``). The same arguments always give the same records.
``synth_vocabulary() -> list[str]``
    Every word and punctuation token the generator can emit (sorted).
``build_synth_tokenizer(save_dir=None) -> transformers.PreTrainedTokenizerFast``
    A lowercasing word-level tokenizer over ``synth_vocabulary()`` with ``<pad>``, ``<unk>``, ``<s>``,
    ``</s>``; saved with ``save_pretrained`` when ``save_dir`` is given. Built offline.

Constants: ``GOLDEN_SOURCE``, ``SHIFTED_SOURCES``, ``TASKS`` (task -> its five steps), ``SPLITS``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dora_engine.data.corrupt import corrupt_records
from dora_engine.data.schema import Record, Response
from dora_engine.errors import UserValueError
from dora_engine.prompt import Prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

GOLDEN_SOURCE = "golden"
SHIFTED_SOURCES = ("verbose", "off_topic", "repetitive")

TASKS: dict[str, tuple[str, ...]] = {
    "bake bread": ("mix flour and water", "knead the dough", "let the dough rise", "heat the oven",
                   "bake until brown"),
    "plant a tree": ("dig a deep hole", "loosen the roots", "place the tree in the hole",
                     "fill the hole with soil", "water the tree"),
    "clean a window": ("mix soap and water", "wipe the glass", "scrub the corners", "rinse with clean water",
                       "dry with a cloth"),
    "fix a flat tire": ("remove the wheel", "find the hole", "patch the tube", "pump the tire",
                        "put the wheel back"),
    "learn to swim": ("practice in shallow water", "float on your back", "kick your legs", "move your arms",
                      "breathe to the side"),
    "make tea": ("boil fresh water", "warm the pot", "add the tea leaves", "steep for three minutes",
                 "pour the tea"),
    "paint a wall": ("clean the wall", "tape the edges", "apply a primer", "roll the paint",
                     "add a second coat"),
    "write a letter": ("choose a greeting", "state your purpose", "add the details", "close politely",
                       "sign your name"),
    "save money": ("track your spending", "set a budget", "cut small costs", "open a savings account",
                   "save every month"),
    "cook rice": ("rinse the rice", "add water to the pot", "bring it to a boil", "cover and simmer",
                  "rest before serving"),
    "train a dog": ("use short sessions", "reward good behavior", "repeat simple commands", "stay patient",
                    "practice every day"),
    "study for an exam": ("make a schedule", "review your notes", "test yourself", "take short breaks",
                          "sleep well"),
    "start running": ("buy good shoes", "walk before you run", "run slowly", "increase distance gradually",
                      "rest between runs"),
    "grow tomatoes": ("choose a sunny spot", "plant the seeds", "water the soil", "support the stems",
                      "pick ripe fruit"),
    "wash a car": ("rinse the car", "use car soap", "wash from the top", "rinse again", "dry with a towel"),
    "sleep better": ("keep a regular schedule", "avoid late coffee", "dim the lights", "keep the room cool",
                     "put away screens"),
    "make a salad": ("wash the greens", "chop the vegetables", "add some nuts", "mix a dressing",
                     "toss everything together"),
    "change a light bulb": ("turn off the power", "let the bulb cool", "unscrew the old bulb",
                            "screw in the new bulb", "turn the power on"),
    "learn a language": ("learn common words", "practice speaking daily", "listen to native speakers",
                         "read simple books", "review with flash cards"),
    "organize a desk": ("clear everything off", "sort the items", "throw away trash", "use small boxes",
                        "keep only daily tools"),
    "brew coffee": ("grind the beans", "heat the water", "pour over the grounds", "wait four minutes",
                    "press the plunger"),
    "iron a shirt": ("fill the iron with water", "set the right heat", "iron the collar", "press the sleeves",
                     "hang the shirt"),
    "pack a suitcase": ("make a list", "roll your clothes", "put shoes at the bottom", "fill the gaps",
                        "close the zipper"),
    "build a campfire": ("clear a safe spot", "gather dry wood", "stack small sticks", "light the kindling",
                         "add bigger logs"),
    "bake cookies": ("cream butter and sugar", "add the eggs", "stir in the flour", "scoop the dough",
                     "bake for ten minutes"),
    "ride a bike": ("adjust the seat", "hold the handlebars", "push off with one foot", "pedal steadily",
                    "look ahead"),
    "clean the kitchen": ("clear the counters", "wash the dishes", "wipe the stove", "sweep the floor",
                          "take out the trash"),
    "tie a tie": ("drape it around your neck", "cross the wide end over", "loop it up through the neck",
                  "pull it down through the knot", "tighten the knot"),
    "boil an egg": ("place the egg in a pot", "cover with cold water", "bring the water to a boil",
                    "cook for nine minutes", "cool in ice water"),
    "make pancakes": ("whisk the batter", "heat a pan", "pour a small circle", "flip when bubbles form",
                      "serve with syrup"),
    "wrap a gift": ("measure the paper", "cut the paper", "fold the edges", "tape the seams", "add a ribbon"),
    "walk a dog": ("attach the leash", "bring some water", "keep a steady pace", "let the dog sniff",
                   "clean up after it"),
}

PROMPT_TEMPLATES = (
    "How do I {task}?",
    "What is the best way to {task}?",
    "Can you explain how to {task}?",
    "Give me tips to {task}.",
    "How should I {task}?",
    "What steps do I need to {task}?",
    "I want to {task}. Where do I start?",
    "Please tell me how to {task}.",
    "Could you show me how to {task}?",
    "What do I do to {task}?",
    "Explain the steps to {task}.",
    "I need help. How can I {task}?",
    "Teach me to {task}.",
    "What should I know to {task}?",
)

SPLITS = ("all", "train", "eval")


def prompt_pairs(split: str = "all") -> list[tuple[str, str]]:
    """The (task, template) pairs of ``split``: ``train`` and ``eval`` are the two halves of the grid in a
    checkerboard (task i with template j is ``eval`` when i + j is odd), so every task and every template
    occurs in both halves while no prompt text does; ``all`` is the whole grid."""
    if split not in SPLITS:
        raise UserValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    return [
        (task, template)
        for i, task in enumerate(TASKS)
        for j, template in enumerate(PROMPT_TEMPLATES)
        if split == "all" or ((i + j) % 2 == 1) == (split == "eval")
    ]

# {a}, {b}, {c}: three steps in order.
ANSWER_TEMPLATES = (
    "To {task}, {a}, then {b}, and finally {c}.",
    "First {a}. Next {b}. Then {c}.",
    "You should {a}, {b}, and {c}. That is how you {task}.",
)

FILLER_SENTENCES = (
    "That is a great question and many people ask it.",
    "There are many different opinions about this topic.",
    "It really depends on your own situation and goals.",
    "Of course, everyone is different in many ways.",
    "You may want to think about it carefully for a while.",
    "Many experts have written about this in great detail.",
    "In the end, it is up to you to decide what works.",
    "I hope this helps you with what you are looking for.",
)

STOP_WORDS = frozenset(
    "a an the to and then first next finally of in on for with your you it is that this how do i what can "
    "me give tips best way explain should be are as at by from or so if not".split()
)

COVERAGE_TARGET = 6
LENGTH_BUDGET = 40

_WORD = re.compile(r"[a-z]+")
_TOKEN = re.compile(r"\w+|[^\w\s]")  # what the tokenizer's pre-tokenizers split text into
_PLACEHOLDER = re.compile(r"\{\w+\}")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _prompt_text(prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    user_turns = [m["content"] for m in prompt if m.get("role") == "user"]
    return user_turns[-1] if user_turns else " ".join(m["content"] for m in prompt)


def _content(words: list[str]) -> list[str]:
    return [w for w in words if w not in STOP_WORDS]


_TASK_WORDS = {task: tuple(task.split()) for task in TASKS}


def find_task(prompt: Prompt) -> str | None:
    """The task a prompt asks about (the longest task name it contains as whole words), or None."""
    padded = " " + " ".join(_words(_prompt_text(prompt))) + " "
    found = [task for task, words in _TASK_WORDS.items() if f" {' '.join(words)} " in padded]
    return max(found, key=len) if found else None


def _relevant_words(prompt: Prompt) -> frozenset[str]:
    task = find_task(prompt)
    if task is None:
        return frozenset(_content(_words(_prompt_text(prompt))))
    return frozenset(_content(_words(" ".join((task, *TASKS[task])))))


def oracle_reward(prompt: Prompt, response: str) -> float:
    """The known oracle: precision + coverage - repetition - length_excess (see the module docstring)."""
    words = _words(response)
    content = _content(words)
    relevant = _relevant_words(prompt)
    precision = sum(w in relevant for w in content) / len(content) if content else 0.0
    coverage = min(1.0, len(set(content) & relevant) / COVERAGE_TARGET)
    bigrams = list(zip(words, words[1:], strict=False))
    repetition = 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    length_excess = max(0, len(words) - LENGTH_BUDGET) / LENGTH_BUDGET
    return precision + coverage - repetition - length_excess


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def _golden(task: str, rng: random.Random) -> str:
    a, b, c = (TASKS[task][i] for i in sorted(rng.sample(range(len(TASKS[task])), 3)))
    template = rng.choice(ANSWER_TEMPLATES)
    return _sentence_case(template.format(task=task, a=a, b=b, c=c))


def _verbose(task: str, rng: random.Random) -> str:
    fillers = rng.sample(FILLER_SENTENCES, rng.randint(3, 5))
    cut = rng.randint(1, len(fillers) - 1)
    return " ".join([*fillers[:cut], _golden(task, rng), *fillers[cut:]])


def _off_topic(task: str, rng: random.Random) -> str:
    other = rng.choice([t for t in TASKS if t != task])
    return _golden(other, rng)


def _repetitive(task: str, rng: random.Random) -> str:
    step = rng.choice(TASKS[task])
    times = rng.randint(3, 6)
    return _sentence_case(f"To {task}, " + ", ".join([step] * times) + ".")


_GENERATORS = {
    GOLDEN_SOURCE: _golden,
    "verbose": _verbose,
    "off_topic": _off_topic,
    "repetitive": _repetitive,
}


def synth_response(source: str, task: str, rng: random.Random) -> str:
    """One response of ``source`` (``GOLDEN_SOURCE`` or one of ``SHIFTED_SOURCES``) to a prompt about ``task``."""
    if source not in _GENERATORS:
        raise ValueError(f"unknown synth source {source!r}; valid: {sorted(_GENERATORS)}")
    return _GENERATORS[source](task, rng)


def _check_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    if mix is None:
        return {s: 1.0 for s in SHIFTED_SOURCES}
    unknown = sorted(set(mix) - set(SHIFTED_SOURCES))
    if unknown:
        raise UserValueError(f"mix: unknown shifted source(s) {unknown}; valid: {list(SHIFTED_SOURCES)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise UserValueError(f"mix: weights must be >= 0 with a positive sum, got {dict(mix)}")
    return {s: float(w) for s, w in mix.items() if w > 0}


def synth_records(
    num_prompts: int = 200,
    k: int = 4,
    golden_per_prompt: int = 1,
    mix: Mapping[str, float] | None = None,
    label_noise: float = 0.0,
    length_bias: float = 0.0,
    seed: int = 0,
    golden_fraction: float = 1.0,
    split: str = "all",
) -> list[Record]:
    """The synthetic mixture dataset (see the module docstring for every option)."""
    if not 0 <= golden_fraction <= 1:
        raise UserValueError(f"golden_fraction must lie in [0, 1], got {golden_fraction}")
    if num_prompts < 1:
        raise UserValueError(f"num_prompts must be >= 1, got {num_prompts}")
    if k < 2:
        raise UserValueError(f"k must be >= 2, got {k}")
    if not 0 <= golden_per_prompt <= k:
        raise UserValueError(f"golden_per_prompt must lie in [0, k={k}], got {golden_per_prompt}")
    if length_bias < 0:
        raise UserValueError(f"length_bias must be >= 0, got {length_bias}")
    weights = _check_mix(mix)
    rng = random.Random(seed)
    prompts = prompt_pairs(split)
    with_golden = round(num_prompts * golden_fraction)
    order: list[tuple[str, str]] = []
    records = []
    for i in range(num_prompts):
        if not order:  # cycle through every (task, template) pair before repeating one
            order = prompts[:]
            rng.shuffle(order)
        task, template = order.pop()
        prompt = template.format(task=task)
        golden = golden_per_prompt if i < with_golden else 0
        sources = [GOLDEN_SOURCE] * golden + rng.choices(list(weights), weights=list(weights.values()), k=k - golden)
        rng.shuffle(sources)
        responses = []
        for source in sources:
            text = synth_response(source, task, rng)
            score = oracle_reward(prompt, text) + length_bias * len(_words(text)) / LENGTH_BUDGET
            responses.append(Response(text, source, score))
        records.append(Record(f"synth-{seed}-{i:06d}", prompt, responses, meta={"task": task}))
    if label_noise > 0:
        records = corrupt_records(records, label_noise, seed)
    return records


def synth_vocabulary() -> list[str]:
    """Every token (lowercased word or punctuation mark) that prompts and responses can contain."""
    texts = [*TASKS, *(s for steps in TASKS.values() for s in steps), *PROMPT_TEMPLATES, *ANSWER_TEMPLATES,
             *FILLER_SENTENCES]
    tokens: set[str] = set()
    for text in texts:
        tokens.update(_TOKEN.findall(_PLACEHOLDER.sub(" ", text).lower()))
    return sorted(tokens)


SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")


def build_synth_tokenizer(save_dir: str | os.PathLike | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for the synth vocabulary, wrapped for transformers (see the module docstring)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *synth_vocabulary()])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if save_dir is not None:
        tokenizer.save_pretrained(os.fspath(save_dir))
    return tokenizer
