"""MeteoRA's two fixed few-shot examples of composite-n, as rows of each sub-task's own data.

Every composite prompt MeteoRA builds opens with the same two hand-picked examples (its create_composite.py):
example k asks the k-th fixed question of every sub-task, then answers them as a numbered list. Its questions
are ordinary rows of the sub-tasks' data, so here each is named by a piece of its input plus its gold answer
(and its number of choices where one narrative comes with several distractor sets), looked up among the task's
rows (``data.tasks.task_pool``) and turned into a prompt by the same code as every other row: the examples have
exactly the format of the questions after them, and their answers are the rows' gold answers.

    rows = fixed_shots("strategyqa", 2)     # [{"prompt", "answer", ...}, {...}]: "Can Hulk's alter ego ...", ...

MeteoRA's news_commentary_de and alpaca examples are rows of the Hugging Face data sets; offline, their BIG-bench
substitutes (data/task_table.py) do not hold them, so two fixed rows of the substitute stand in
(``SUBSTITUTE_SHOTS``). A sub-task MeteoRA never composes (composite runs over other task lists, e.g. the
tests') gets the two shortest of the first 64 shuffled training rows, also fixed for a given data version.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data.errors import LoramuxDataError
from data.tasks import data_source, get_task, load_split, task_pool

SHOT_POOL = 64


@dataclass(frozen=True)
class Shot:
    """A row named by a piece of its input (``where``), its gold answer and, optionally, its number of choices."""

    where: str
    answer: str
    choices: int | None = None

    def matches(self, row: dict) -> bool:
        return (self.where in row["inputs"] and row["answer"].strip() == self.answer.strip()
                and (self.choices is None or len(row["choices"]) == self.choices))


SHOTS: dict[str, tuple[Shot, Shot]] = {
    "logical_deduction": (
        Shot("On a branch, there are five birds: a cardinal, a crow, a falcon, a robin, and a blue jay. The robin is "
             "to the right of the cardinal.", "The falcon is the leftmost."),
        Shot("In a golf tournament, there were three golfers: Ana, Rob, and Joe. Joe finished above Ana.",
             "Joe finished second.")),
    "question_selection": (
        Shot("Short Answer: magazines and journals Context: Tesla wrote",
             "Who was the first to post tesla's writings?"),
        Shot("Short Answer: two months Context: It was not until January 1518",
             "How long did the theses take to spread through europe?")),
    "abstract_narrative_understanding": (
        Shot("One of my students invited me on the opening of his new coffee shop business", "Once bitten, twice shy",
             choices=5),
        Shot("David wants to be well liked by his peers", "Do unto others as you would have them do to you",
             choices=5)),
    "goal_step_wikihow": (
        Shot("In order to 'Import China Teas Into USA'", "Form a Company."),
        Shot("The most reasonable step of 'Photograph Star Trails'", "Place the camera on a sturdy base")),
    "winowhy": (
        Shot("I can't cut that tree down with that axe; it is too small. The 'it' refers to the axe because The axe "
             "is smaller to cut the tree.", "correct"),
        Shot("Ann asked Mary what time the library closes, because she had forgotten. The 'she' refers to ann because "
             "Ann already didn't know.", "incorrect")),
    "strategyqa": (
        Shot("Can Hulk's alter ego explain atomic events?",
             "Yes. Hulk's alter ego is Dr. Robert Bruce Banner. Dr. Robert Bruce Banner is a nuclear physicist.  "
             "Nuclear physics is the field of physics that studies atomic nuclei and their constituents and "
             "interactions."),
        Shot("Can Iowa be hidden in the English Channel?",
             "No. The maximum width of the English Channel is 150 miles. The minimum width of Iowa is 200 miles.")),
    "disfl_qa": (
        Shot("In the most basic sense what did a researchers wait no Turing machine emulate", "a computer"),
        Shot("When was the Latin version of the word Norman first heard no I mean recorded", "9th century")),
    "news_commentary_de": (
        Shot("Natürlich kann das auch in Demokratien passieren.", "Of course, democracies can be captured too."),
        Shot("Bei stabilen und vorhersehbaren Wechselkursen ist der Carry Trade ein relativ sicheres Geschäft.",
             "When exchange rates are stable and predictable, the carry trade is relatively safe.")),
    "alpaca": (
        Shot("Suggest a title for an article about ransomware attacks.",
             '"The Growing Threat of Ransomware Attacks: What You Need to Know"'),
        Shot("Design a program that can take a list of numbers and sort them in ascending order.",
             "The program should take a list of numbers as input, sort the numbers in ascending order, and output "
             "the sorted list. The program should include a loop to traverse the list and a comparison function to "
             "compare two elements and determine their order.")),
    "linguistics_puzzles": (
        Shot("English: a short crow will dislike a small monkey Other:", "woci wuli koxevu woci xapi ramivu xatube"),
        Shot("Other: datu xijagu xixuqo baxazeko datuji xifani xidunimo English:",
             "slow people dislike excellent birds")),
}

SUBSTITUTE_SHOTS: dict[str, tuple[Shot, Shot]] = {
    "news_commentary_de": (
        Shot("Bitte sie auch, es dir zu sagen, wenn etwas", "Tell the person you are about to begin."),
        Shot("Für die Reihen 2-41 gilt", "Single crochet another 40 rows. Complete a second cuff.")),
    "alpaca": (
        Shot("Fact: Viruses are not cells.", "Viruses."),
        Shot("Question: The moon ____ around the Earth.", "B.")),
}


def _shortest_training_rows(task: str, shots: int, seed: int, split_seed: int) -> list[dict]:
    train = load_split(task, "train", seed=split_seed, max_train=SHOT_POOL)
    train = train.select(np.random.default_rng(seed).permutation(len(train)).tolist())
    order = sorted(range(len(train)), key=lambda i: (len(train[i]["prompt"]) + len(train[i]["answer"]), i))
    if len(order) < shots:
        raise LoramuxDataError(f"task {task} has {len(order)} training rows, fewer than shots={shots}; lower shots")
    return [dict(train[i]) for i in order[:shots]]


def fixed_shots(task: str, shots: int, *, seed: int = 47, split_seed: int = 0) -> list[dict]:
    """The first ``shots`` (at most 2) fixed example rows of ``task`` for its current data source."""
    if not 0 <= shots <= 2:
        raise LoramuxDataError(f"composite shots={shots}: MeteoRA's prompts hold two fixed examples; use 0, 1 or 2")
    if shots == 0:
        return []
    offline = get_task(task).source == "hf" and data_source(task).startswith("substitute-for")
    table = SUBSTITUTE_SHOTS if offline else SHOTS
    if task not in table:
        return _shortest_training_rows(task, shots, seed, split_seed)
    pool = task_pool(task)
    out = []
    for shot in table[task][:shots]:
        hits = [r for r in pool if shot.matches(r)]
        if len(hits) != 1:
            raise LoramuxDataError(f"composite example of {task} ({shot.where[:40]!r}...) matches {len(hits)} rows of "
                                   f"its data, not 1; re-fetch the data (python -m data.fetch --bigbench --force)")
        out.append(hits[0])
    return out


__all__ = ["SHOTS", "SUBSTITUTE_SHOTS", "Shot", "fixed_shots"]
