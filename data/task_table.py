"""The task registry as a table: the 28 MeteoRA tasks, each a `Task` record (one source of truth).

22 tasks are BIG-bench JSON tasks (subtasks merged, as MeteoRA's HF `bigbench` configs do). 6 are Hugging Face
data sets (gsm8k, cnn_dailymail, alpaca, news_commentary de/es/it -> en). Those six keep their real
`datasets.load_dataset` spec (`HFSpec`) and are used wherever the hub is reachable; offline each one is served by a
*named* BIG-bench substitute recorded here (`Task.substitute`) and printed by every listing:

    gsm8k               -> chinese_remainder_theorem   free-form arithmetic word problems, numeric answer
    cnn_dailymail       -> gem/xsum                    one-sentence news summaries (BLEU/ROUGE)
    alpaca              -> natural_instructions/...    five instruction + input -> response generation subtasks
    news_commentary_de  -> gem/wikilingua_multilingual German rows: German text -> English text
    news_commentary_es  -> gem/wikilingua_multilingual Spanish rows
    news_commentary_it  -> gem/wikilingua_multilingual Italian rows

Metrics follow MeteoRA's eval.py: exact accuracy for formal_fallacies, winowhy,
elementary_math_qa, cs_algorithms, tracking_shuffled_objects, unit_conversion, paragraph_segmentation,
epistemic_reasoning; fuzzy accuracy (gold contained in the output) for the other accuracy tasks; strategyqa's
yes/no rule plus BLEU and ROUGE; gsm8k's "number after 'The answer is', else the last number" rule; BLEU
(sacrebleu) and ROUGE-1/2/L for the generation tasks.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field

from data.errors import LoramuxDataError

METEORA_TEMPLATE = "[INST] {inputs} [/INST]\n"

# metric names (each is a local evaluate module under data/metrics/<name>/)
EXACT = ("exact_accuracy",)
FUZZY = ("fuzzy_accuracy",)
GENERATION = ("bleu", "rouge")


@dataclass(frozen=True)
class HFSpec:
    """How the real Hugging Face data set is loaded and turned into (inputs, answer) rows.

    `fields` names the row layout the converter in data/hf_sources.py understands; `test_split` None means the data
    set has no test split and 20% of `train_split` is held out (alpaca, news_commentary, as MeteoRA does).
    """

    path: str
    name: str | None
    fields: str  # "gsm8k" | "cnn_dailymail" | "alpaca" | "translation:<src>"
    template: str
    train_split: str = "train"
    test_split: str | None = "test"
    cap: int | None = 100_000  # rows kept of the train split (MeteoRA: train <= 100k; news_commentary 100k total)
    test_cap: int | None = 50_000  # rows kept of the test split (MeteoRA: test <= 50k)


@dataclass(frozen=True)
class Task:
    """One task: where its data lives, how a prompt is built, how an answer is scored.

    name: registry key; source: "bigbench" or "hf"; kind: "mcq" (answer is one of `choices`) or "qa" (free text);
    template: MeteoRA's prompt wrapper, `{inputs}` is the BIG-bench-formatted input (task prefix + input prefix +
    input [+ choices, where the BIG-bench file appends them] + output prefix); `choice_lead`: MeteoRA appends its
    own choice lines to this task (`choice_lead` then one `choice: X` line per choice; None: it appends none);
    metrics: local metric module names; bigbench: BIG-bench task dirs (task or task/subtask, relative to
    benchmark_tasks) that hold this task's data, for "hf" tasks the substitute's dirs; bigbench_filter: keep only
    examples whose `comment` starts with this; hf: the real HF data set; substitute: the BIG-bench stand-in's
    name used offline (None for BIG-bench tasks).
    """

    name: str
    source: str
    kind: str
    metrics: tuple[str, ...]
    bigbench: tuple[str, ...]
    template: str = METEORA_TEMPLATE
    choice_lead: str | None = None
    bigbench_filter: str | None = None
    hf: HFSpec | None = None
    substitute: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def substitute_for(self) -> str | None:
        """The HF data set this task's offline data stands in for (None for BIG-bench tasks)."""
        return self.name if self.substitute else None


def _bb(name, kind, metrics, dirs=None, **kw) -> Task:
    return Task(name=name, source="bigbench", kind=kind, metrics=metrics, bigbench=tuple(dirs or (name,)), **kw)


def _sub(*subs, task):
    return tuple(f"{task}/{s}" for s in subs)


_NATURAL_INSTRUCTIONS = _sub(
    "subtask024_cosmosqa_answer_generation",
    "subtask036_qasc_topic_word_to_generate_related_fact",
    "subtask041_qasc_answer_generation",
    "subtask045_miscellaneous_sentence_paraphrasing",
    "subtask047_misc_answering_science_questions",
    task="natural_instructions",
)

_TRANSLATE = {
    "de": "Den folgenden Text ins Englische übersetzen.\n",
    "es": "Traduce el siguiente texto al inglés.\n",
    "it": "Traduci il seguente testo in inglese.\n",
}
_WIKILINGUA_LANG = {"de": "german", "es": "spanish", "it": "italian"}


def _news(lang: str) -> Task:
    config = "de-en" if lang == "de" else f"en-{lang}"
    return Task(
        name=f"news_commentary_{lang}",
        source="hf",
        kind="qa",
        metrics=GENERATION,
        bigbench=("gem/wikilingua_multilingual",),
        bigbench_filter=f"wiki_lingua_{_WIKILINGUA_LANG[lang]}_",
        hf=HFSpec(
            "Helsinki-NLP/news_commentary",
            config,
            f"translation:{lang}",
            "[INST] " + _TRANSLATE[lang] + "{inputs} [/INST]\n",
            test_split=None,
        ),
        substitute=f"gem/wikilingua_multilingual[{_WIKILINGUA_LANG[lang]}]",
        notes=f"{lang}->en translation; offline: WikiLingua {_WIKILINGUA_LANG[lang]} article -> English summary",
    )


_TABLE: list[Task] = [
    _bb("abstract_narrative_understanding", "mcq", FUZZY, choice_lead="\n"),
    _bb("contextual_parametric_knowledge_conflicts", "mcq", FUZZY),
    _bb("cs_algorithms", "mcq", EXACT),
    _bb("disfl_qa", "qa", FUZZY),
    _bb("elementary_math_qa", "mcq", EXACT),
    _bb("epistemic_reasoning", "mcq", EXACT),
    _bb("formal_fallacies_syllogisms_negation", "mcq", EXACT),
    _bb("goal_step_wikihow", "mcq", FUZZY),
    _bb("language_identification", "mcq", FUZZY),
    _bb("linguistics_puzzles", "qa", GENERATION),
    _bb("logical_deduction", "mcq", FUZZY, choice_lead=" Which choice is correct?\n"),
    _bb("object_counting", "qa", FUZZY),
    _bb("paragraph_segmentation", "qa", EXACT),
    _bb("play_dialog_same_or_different", "mcq", FUZZY),
    _bb("question_selection", "mcq", FUZZY),
    _bb("reasoning_about_colored_objects", "mcq", FUZZY),
    _bb("strategyqa", "qa", ("strategyqa_accuracy", "bleu", "rouge")),
    _bb("topical_chat", "qa", GENERATION),
    _bb("tracking_shuffled_objects", "mcq", EXACT, choice_lead="\n"),
    _bb("unit_conversion", "mcq", EXACT, choice_lead="\n"),
    _bb("vitaminc_fact_verification", "mcq", FUZZY),
    _bb("winowhy", "mcq", EXACT),
    Task(
        name="gsm8k",
        source="hf",
        kind="qa",
        metrics=("gsm8k_accuracy",),
        bigbench=("chinese_remainder_theorem",),
        hf=HFSpec("openai/gsm8k", "main", "gsm8k", "[INST] {inputs} [/INST]\n"),
        substitute="chinese_remainder_theorem",
        notes="grade-school math; offline: free-form arithmetic word problems with a numeric answer",
    ),
    Task(
        name="cnn_dailymail",
        source="hf",
        kind="qa",
        metrics=GENERATION,
        bigbench=("gem/xsum",),
        hf=HFSpec(
            "abisee/cnn_dailymail",
            "3.0.0",
            "cnn_dailymail",
            "[INST] Generate a summarization of the news article.\n{inputs} [/INST]\n",
        ),
        substitute="gem/xsum",
        notes="news summarisation; offline: XSum one-sentence news summaries (GEM)",
    ),
    Task(
        name="alpaca",
        source="hf",
        kind="qa",
        metrics=GENERATION,
        bigbench=_NATURAL_INSTRUCTIONS,
        hf=HFSpec("tatsu-lab/alpaca", None, "alpaca", "[INST] {inputs} [/INST]\n", test_split=None),
        substitute="natural_instructions[5 generation subtasks]",
        notes="instruction following; offline: five natural_instructions generation subtasks",
    ),
    _news("de"),
    _news("es"),
    _news("it"),
]

TASKS: dict[str, Task] = {t.name: t for t in _TABLE}

METEORA28: tuple[str, ...] = tuple(TASKS)

# DLP-LoRA uses 26 of MeteoRA's tasks, 17 multiple-choice + 9 QA; its list was never published.
# Our reading: the 16 BIG-bench tasks whose data are multiple choice, plus strategyqa (its JSON carries Yes/No
# target_scores, so a classifier-style evaluation counts it as MCQ) = 17; the 9 QA are the tasks MeteoRA scores by
# generation (BLEU/ROUGE: linguistics_puzzles, topical_chat, cnn_dailymail, alpaca, news de/es/it) plus the two
# free-form generation tasks gsm8k and disfl_qa. Left out: object_counting and paragraph_segmentation (one-word
# / label-string answers scored by exact match, neither MCQ nor BLEU/ROUGE text; paragraph_segmentation's inputs
# also far exceed the 256-token router context DLP-LoRA uses).
DLP26_MCQ: tuple[str, ...] = tuple(t.name for t in _TABLE if t.kind == "mcq") + ("strategyqa",)
DLP26_QA: tuple[str, ...] = (
    "disfl_qa",
    "linguistics_puzzles",
    "topical_chat",
    "gsm8k",
    "cnn_dailymail",
    "alpaca",
    "news_commentary_de",
    "news_commentary_es",
    "news_commentary_it",
)
DLP26: tuple[str, ...] = DLP26_MCQ + DLP26_QA

# MeteoRA's composite-n sub-task lists, in its order (its create_composite.py): the 3- and 5-lists are not
# prefixes of the 10-list.
COMPOSITE3 = ("logical_deduction", "question_selection", "strategyqa")
COMPOSITE5 = ("logical_deduction", "question_selection", "abstract_narrative_understanding", "goal_step_wikihow",
              "strategyqa")
COMPOSITE10 = ("logical_deduction", "question_selection", "abstract_narrative_understanding", "goal_step_wikihow",
               "winowhy", "strategyqa", "disfl_qa", "news_commentary_de", "alpaca", "linguistics_puzzles")

SELECTIONS: dict[str, tuple[str, ...]] = {
    "meteora28": METEORA28,
    "dlp26": DLP26,
    "composite3": COMPOSITE3,
    "composite5": COMPOSITE5,
    "composite10": COMPOSITE10,
}


def get_task(name: str | Task) -> Task:
    """The registered Task; an unknown name raises one line listing close matches."""
    if isinstance(name, Task):
        return name
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(str(name), list(TASKS) + list(SELECTIONS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise LoramuxDataError(f"unknown task {name!r}; {hint}(list: python -m data.tasks)")


def select(names: str | Iterable[str]) -> tuple[str, ...]:
    """Task names of a named selection (meteora28, dlp26, composite3/5/10), one task, a comma list, or a list."""
    if isinstance(names, str):
        if names in SELECTIONS:
            return SELECTIONS[names]
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        for t in SELECTIONS[n] if n in SELECTIONS else (get_task(n).name,):
            if t not in out:
                out.append(t)
    if not out:
        raise LoramuxDataError("empty task selection; name tasks or one of " + ", ".join(SELECTIONS))
    return tuple(out)


def bigbench_dirs(task_names=None) -> tuple[str, ...]:
    """Every BIG-bench dir (task or task/subtask) the named tasks (default: all registered) read."""
    names = METEORA28 if task_names is None else select(list(task_names))
    return tuple(sorted({d for n in names for d in TASKS[n].bigbench}))
