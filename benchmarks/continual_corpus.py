"""The continual-learning benchmark's synthetic world: a pre-training corpus and the new tasks learned after it.

Everything is generated here from a seed, so the pre-trained checkpoint is reproducible and its cache key
can be the hash of this module's source and the generator's settings.

* A **world** of people, each with a home city, a favourite colour and a pet; its facts recur throughout
  the corpus, so the pre-trained model holds knowledge, not only grammar.
* A **language-like corpus**: short documents of sentences from a small grammar (determiners, adjectives,
  nouns, verbs with agreement, prepositional phrases, relative clauses) mixed with sentences stating the
  world's facts in several phrasings.
* **Task families** as chat conversations (question, then answer): addition, comparison, the successor of a
  number, counting letters, reversing a word, the first letter of a word, sorting digits, the plural of a
  noun, and questions about the world. Rule-based families generate fresh instances for held-out
  evaluation; the world questions ask about the same facts the documents state.
* **New tasks** learned in sequence after pre-training: associations that the corpus never states (a code, a
  city and a colour for invented words), each task in its own phrasing over its own words.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

Fact = tuple[str, str]
Chat = list[dict[str, str]]

_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emil",
    "Fatma",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luca",
    "Mina",
    "Nadia",
    "Oskar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Vera",
    "Wilma",
    "Xena",
    "Yusuf",
    "Zora",
    "Anton",
    "Bea",
    "Carlo",
    "Dina",
    "Elias",
    "Flora",
    "Gino",
    "Hanna",
    "Ivan",
    "Julia",
    "Kurt",
    "Lena",
    "Marco",
    "Nora",
]
CITIES = [
    "Paris",
    "Lima",
    "Oslo",
    "Rome",
    "Cairo",
    "Delhi",
    "Tokyo",
    "Quito",
    "Dakar",
    "Hanoi",
    "Sofia",
    "Perth",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"]
_PETS = ["cat", "dog", "bird", "fish", "horse", "rabbit", "turtle", "mouse"]
_NOUNS = [
    "dog",
    "cat",
    "bird",
    "child",
    "teacher",
    "farmer",
    "river",
    "house",
    "garden",
    "tree",
    "ship",
    "city",
    "king",
    "queen",
    "doctor",
    "baby",
    "friend",
    "box",
    "book",
    "road",
    "window",
]
_PLURAL = {"child": "children", "box": "boxes", "baby": "babies", "city": "cities"}
_ADJECTIVES = [
    "small",
    "big",
    "old",
    "young",
    "red",
    "quiet",
    "happy",
    "tired",
    "bright",
    "dark",
    "heavy",
    "gentle",
]
_VERBS = ["sees", "finds", "likes", "follows", "helps", "watches", "carries", "paints", "visits", "remembers"]
_INTRANSITIVE = ["sleeps", "runs", "sings", "waits", "laughs", "falls"]
_PREPOSITIONS = ["near", "behind", "under", "above", "beside"]
_ADVERBS = ["slowly", "quickly", "often", "never", "always"]


@dataclasses.dataclass(frozen=True)
class World:
    """Who lives where, likes which colour and keeps which pet."""

    city: dict[str, str]
    colour: dict[str, str]
    pet: dict[str, str]

    @property
    def people(self) -> list[str]:
        return list(self.city)


def make_world(seed: int) -> World:
    rng = random.Random(seed)
    return World(
        city={name: rng.choice(CITIES) for name in _NAMES},
        colour={name: rng.choice(COLOURS) for name in _NAMES},
        pet={name: rng.choice(_PETS) for name in _NAMES},
    )


def pseudo_words(rng: random.Random, count: int, taken: set[str], syllables: int = 3) -> list[str]:
    """Distinct pronounceable invented words that are not in ``taken`` (which they are added to)."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(syllables))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def plural(noun: str) -> str:
    return _PLURAL.get(noun, noun + "s")


# ------------------------------------------------------------------------------------------- language
def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    """A noun phrase and whether it is plural."""
    noun, many = rng.choice(_NOUNS), rng.random() < 0.3
    adjective = f"{rng.choice(_ADJECTIVES)} " if rng.random() < 0.5 else ""
    determiner = rng.choice(("the", "some", "two")) if many else rng.choice(("the", "a", "every"))
    phrase = f"{determiner} {adjective}{plural(noun) if many else noun}"
    if rng.random() < 0.2:
        phrase += f" {rng.choice(_PREPOSITIONS)} the {rng.choice(_NOUNS)}"
    return phrase, many


def _verb(verb: str, many: bool) -> str:
    """The verb (given in its third-person singular) agreeing with its subject."""
    if not many:
        return verb
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith("ches") or verb.endswith("shes"):
        return verb[:-2]
    return verb[:-1]


def _grammar_sentence(rng: random.Random) -> str:
    subject, many = _noun_phrase(rng)
    if rng.random() < 0.3:
        predicate = _verb(rng.choice(_INTRANSITIVE), many)
        if rng.random() < 0.5:
            predicate += f" {rng.choice(_ADVERBS)}"
    else:
        obj, _ = _noun_phrase(rng)
        predicate = f"{_verb(rng.choice(_VERBS), many)} {obj}"
    if rng.random() < 0.2:
        relative, relative_many = _noun_phrase(rng)
        subject += f" that {relative} {_verb(rng.choice(_VERBS), relative_many)}"
    sentence = f"{subject} {predicate}"
    return sentence[0].upper() + sentence[1:] + "."


def _world_sentence(rng: random.Random, world: World) -> str:
    name = rng.choice(world.people)
    city, colour, pet = world.city[name], world.colour[name], world.pet[name]
    return rng.choice(
        (
            f"{name} lives in {city}.",
            f"{name} likes the colour {colour}.",
            f"{name} has a {pet}.",
            f"In {city} lives {name}, who has a {pet}.",
            f"The favourite colour of {name} is {colour}.",
            f"{name} from {city} likes {colour} things.",
        )
    )


def document(rng: random.Random, world: World) -> str:
    """A short paragraph of grammar sentences and statements of the world's facts."""
    sentences = [
        _world_sentence(rng, world) if rng.random() < 0.35 else _grammar_sentence(rng)
        for _ in range(rng.randint(3, 6))
    ]
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------ task families
def _addition(rng: random.Random, _world: World) -> Fact:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"What is {a} + {b}?", str(a + b)


def _larger(rng: random.Random, _world: World) -> Fact:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _successor(rng: random.Random, _world: World) -> Fact:
    a = rng.randint(0, 98)
    return f"What number comes after {a}?", str(a + 1)


def _count_letters(rng: random.Random, _world: World) -> Fact:
    word = pseudo_words(rng, 1, set(), syllables=rng.randint(1, 4))[0]
    return f"How many letters are in {word}?", str(len(word))


def _reverse(rng: random.Random, _world: World) -> Fact:
    word = pseudo_words(rng, 1, set(), syllables=2)[0]
    return f"Reverse the word {word}.", word[::-1]


def _first_letter(rng: random.Random, _world: World) -> Fact:
    word = pseudo_words(rng, 1, set(), syllables=rng.randint(2, 3))[0]
    return f"What is the first letter of {word}?", word[0]


def _sort_digits(rng: random.Random, _world: World) -> Fact:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort {' '.join(map(str, digits))}.", " ".join(map(str, sorted(digits)))


def _plural(rng: random.Random, _world: World) -> Fact:
    noun = rng.choice(_NOUNS)
    return f"What is the plural of {noun}?", plural(noun)


def _world_question(rng: random.Random, world: World) -> Fact:
    name = rng.choice(world.people)
    return rng.choice(
        (
            (f"Where does {name} live?", world.city[name]),
            (f"What colour does {name} like?", world.colour[name]),
            (f"What pet does {name} have?", world.pet[name]),
        )
    )


FAMILIES: dict[str, Callable[[random.Random, World], Fact]] = {
    "addition": _addition,
    "larger": _larger,
    "successor": _successor,
    "count_letters": _count_letters,
    "reverse": _reverse,
    "first_letter": _first_letter,
    "sort_digits": _sort_digits,
    "plural": _plural,
    "world": _world_question,
}


def chat(question: str, answer: str) -> Chat:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One pre-training sample: a plain document, or a chat conversation of a task family."""

    text: str | None = None
    messages: Chat | None = None
    family: str = "language"


def corpus(seed: int, count: int, world: World, chat_share: float = 0.5) -> list[Sample]:
    """``count`` samples: documents and task-family conversations, mixed at ``chat_share``."""
    rng = random.Random(seed)
    names = sorted(FAMILIES)
    samples: list[Sample] = []
    for _ in range(count):
        if rng.random() < chat_share:
            family = rng.choice(names)
            samples.append(Sample(messages=chat(*FAMILIES[family](rng, world)), family=family))
        else:
            samples.append(Sample(text=document(rng, world)))
    return samples


def family_probe(seed: int, per_family: int, world: World) -> dict[str, list[Fact]]:
    """Fresh (question, answer) pairs of every family, for scoring what pre-training taught."""
    rng = random.Random(seed)
    return {name: [make(rng, world) for _ in range(per_family)] for name, make in sorted(FAMILIES.items())}


# --------------------------------------------------------------------------------------------- new tasks
#: The new tasks' phrasings and answers: associations the corpus never states.
NEW_TASKS: tuple[tuple[str, str, Callable[[random.Random], str]], ...] = (
    ("code", "What is the code of {}?", lambda rng: str(rng.randrange(100, 1000))),
    ("capital", "Which city rules {}?", lambda rng: rng.choice(CITIES)),
    ("flag", "What colour is the flag of {}?", lambda rng: rng.choice(COLOURS)),
)


def new_tasks(seed: int, facts_per_task: int, count: int = len(NEW_TASKS)) -> list[tuple[str, list[Fact]]]:
    """``count`` named tasks of ``facts_per_task`` facts each, over disjoint invented words."""
    if not 1 <= count <= len(NEW_TASKS):
        raise ValueError(f"count must be in [1, {len(NEW_TASKS)}], got {count}")
    rng = random.Random(seed)
    taken: set[str] = set()
    tasks = []
    for name, template, answer in NEW_TASKS[:count]:
        words = pseudo_words(rng, facts_per_task, taken)
        tasks.append((name, [(template.format(word), answer(rng)) for word in words]))
    return tasks
