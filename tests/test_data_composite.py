"""Composite-n: build from real test splits with a training-row 2-shot prefix, parse numbered answers, score."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from needs_assets import needs_bigbench, needs_task_files

from data.composite import (
    INSTRUCTION,
    build_composite,
    composite_prefix,
    parse_composite,
    parse_report,
    score_composite,
)
from data.composite_shots import fixed_shots
from data.errors import LoramuxDataError
from data.tasks import load_split, select, task_pool


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("LORAMUX_USE_HUB", "0")


def _one_line(text):
    return " ".join(text.split())


def _gold_output(answers):
    return "".join(f"{i}. {_one_line(a)}\n" for i, a in enumerate(answers, 1))


def test_parser_reads_numbered_lines_and_counts_oddities():
    text = "1. first answer\n2.second\n11. not one\n 3. third  \n2. again\n0. zero"
    assert parse_composite(text, 3) == ["first answer", "second", "third"]
    answers, counts = parse_report(text, 3)
    assert counts == {"missing": 0, "extra": 2, "duplicate": 1}
    answers, counts = parse_report("blah\n2. only two", 3)
    assert answers == ["", "only two", ""] and counts["missing"] == 2
    assert parse_composite("", 2) == ["", ""]
    assert parse_composite("The 1. is inline, not a list\n1. real", 1) == ["real"]
    assert parse_composite("1. 2.5 meters\n2.5 is a decimal, not answer 2", 2) == ["2.5 meters", ""]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(whitelist_categories=("L", "N", "P", "Zs")), max_size=30), min_size=1,
                max_size=12))
def test_numbered_answers_round_trip(answers):
    answers = [" ".join(a.split()) for a in answers]
    assert parse_composite(_gold_output(answers), len(answers)) == answers


@needs_task_files
def test_composite3_round_trip_scores_perfect_and_a_dropped_answer_costs_its_row():
    ds = build_composite("composite3", rows=10)
    assert ds.column_names == ["prompt", "answers", "subtasks", "sources"] and len(ds) == 10
    assert ds[0]["subtasks"] == ["logical_deduction", "question_selection", "strategyqa"]
    outputs = [_gold_output(a) for a in ds["answers"]]
    report = score_composite(outputs, ds)
    for name in ("logical_deduction", "question_selection", "strategyqa"):
        assert report["per_task"][name]["accuracy"] == 1.0
    assert report["per_task"]["strategyqa"]["rouge1"] == pytest.approx(1.0)
    assert report["attempts"] == 3.0 and report["correct"] == pytest.approx(3.0)
    assert (report["missing"], report["extra"], report["duplicate"]) == (0, 0, 0)

    dropped = list(outputs)
    lines = dropped[0].splitlines(keepends=True)
    dropped[0] = lines[0] + lines[2]  # row 0 loses its answer to sub-task 2
    report = score_composite(dropped, ds)
    assert report["per_task"]["question_selection"]["accuracy"] == pytest.approx(9 / 10)
    assert report["per_task"]["question_selection"]["empty"] == 1
    assert report["per_task"]["logical_deduction"]["accuracy"] == 1.0
    assert report["attempts"] == pytest.approx(3 - 1 / 10) and report["missing"] == 1


@needs_task_files
def test_rows_join_the_ith_shuffled_test_prompt_after_the_fixed_examples():
    """Row i = the fixed prefix + the i-th prompt of each sub-task's test rows shuffled by one random.Random(seed)
    stream in sub-task order (MeteoRA's procedure), two blank lines apart; the example rows are never asked."""
    import random

    ds = build_composite(["strategyqa", "winowhy"], rows=5)
    prefix = composite_prefix(["strategyqa", "winowhy"])
    shots = {n: {r["prompt"] for r in fixed_shots(n, 2)} for n in ("strategyqa", "winowhy")}
    rng, tests = random.Random(47), {}
    for n in ("strategyqa", "winowhy"):
        rows = [r["prompt"] for r in load_split(n, "test") if r["prompt"] not in shots[n]]
        rng.shuffle(rows)
        tests[n] = rows
    for i, row in enumerate(ds):
        assert row["prompt"] == prefix + tests["strategyqa"][i] + "\n\n" + tests["winowhy"][i] + "\n"
        assert not any(s in row["prompt"][len(prefix):] for s in shots["strategyqa"] | shots["winowhy"])
    assert build_composite(["strategyqa", "winowhy"], rows=5)["prompt"] == ds["prompt"]
    assert build_composite(["strategyqa", "winowhy"], rows=5, seed=1)["prompt"] != ds["prompt"]
    assert composite_prefix(["strategyqa", "winowhy"], shots=0) == INSTRUCTION + "\n\n"
    with pytest.raises(LoramuxDataError, match=r"two fixed examples"):
        composite_prefix(["strategyqa", "winowhy"], shots=3)


def test_meteoras_sub_task_lists_and_order():
    assert select("composite3") == ("logical_deduction", "question_selection", "strategyqa")
    assert select("composite5") == ("logical_deduction", "question_selection", "abstract_narrative_understanding",
                                    "goal_step_wikihow", "strategyqa")
    assert select("composite10") == ("logical_deduction", "question_selection", "abstract_narrative_understanding",
                                     "goal_step_wikihow", "winowhy", "strategyqa", "disfl_qa", "news_commentary_de",
                                     "alpaca", "linguistics_puzzles")
    for n in (5, 10):  # not prefixes of the longer lists: their own order
        assert select(f"composite{n}")[: 3] != select("composite3")


# Golden: MeteoRA's composite-3 template on real BIG-bench rows (its two fixed examples, headers, blank lines,
# ending), and row 0 of the 200 rows. Differences from MeteoRA's hand-typed prefix, all deliberate: choices are
# listed as BIG-bench formats them (question_selection indented after the context, in BIG-bench's permutation),
# and a prompt ends "\n [/INST]" where MeteoRA's own choice lines end it, as in MeteoRA's test rows.
COMPOSITE3_PREFIX = (
    "\nExample 1:\n\n"
    "[INST] The following paragraphs each describe a set of five objects arranged in a fixed order. The statements "
    "are logically consistent within each paragraph.\n\nOn a branch, there are five birds: a cardinal, a crow, a "
    "falcon, a robin, and a blue jay. The robin is to the right of the cardinal. The cardinal is to the right of the "
    "blue jay. The blue jay is the second from the left. The crow is the rightmost. Which choice is correct?\n"
    "choice: The cardinal is the leftmost.\nchoice: The crow is the leftmost.\nchoice: The falcon is the leftmost.\n"
    "choice: The robin is the leftmost.\nchoice: The blue jay is the leftmost.\n [/INST]\n\n"
    "[INST] Given a short answer along with its context, select the most appropriate question which has the given "
    "short answer as its answer.\n\nHere is the short answer followed by the context.\nShort Answer: magazines and "
    "journals Context: Tesla wrote a number of books and articles for magazines and journals. Among his books are My "
    "Inventions: The Autobiography of Nikola Tesla, compiled and edited by Ben Johnston; The Fantastic Inventions of "
    "Nikola Tesla, compiled and edited by David Hatcher Childress; and The Tesla Papers.\n"
    "  choice: Who was in charge of editing tesla's autobiography?\n  choice: Who was the first to post tesla's "
    "writings?\nChoose the appropriate question which has the given answer. [/INST]\n\n"
    "[INST] Q: Can Hulk's alter ego explain atomic events?\nA: [/INST]\n\n"
    "1. The falcon is the leftmost.\n2. Who was the first to post tesla's writings?\n3. Yes. Hulk's alter ego is Dr. "
    "Robert Bruce Banner. Dr. Robert Bruce Banner is a nuclear physicist.  Nuclear physics is the field of physics "
    "that studies atomic nuclei and their constituents and interactions.\n\n\n"
    "Example 2:\n\n"
    "[INST] The following paragraphs each describe a set of three objects arranged in a fixed order. The statements "
    "are logically consistent within each paragraph.\n\nIn a golf tournament, there were three golfers: Ana, Rob, "
    "and Joe. Joe finished above Ana. Rob finished above Joe. Which choice is correct?\nchoice: Ana finished second."
    "\nchoice: Rob finished second.\nchoice: Joe finished second.\n [/INST]\n\n"
    "[INST] Given a short answer along with its context, select the most appropriate question which has the given "
    "short answer as its answer.\n\nHere is the short answer followed by the context.\nShort Answer: two months "
    "Context: It was not until January 1518 that friends of Luther translated the 95 Theses from Latin into German "
    "and printed and widely copied them, making the controversy one of the first in history to be aided by the "
    "printing press. Within two weeks, copies of the theses had spread throughout Germany; within two months, they "
    "had spread throughout Europe.\n  choice: How long did the theses take to spread through europe?\n  choice: How "
    "long did it take for the printing of the theses to spread through germany?\nChoose the appropriate question "
    "which has the given answer. [/INST]\n\n"
    "[INST] Q: Can Iowa be hidden in the English Channel?\nA: [/INST]\n\n"
    "1. Joe finished second.\n2. How long did the theses take to spread through europe?\n3. No. The maximum width of "
    "the English Channel is 150 miles. The minimum width of Iowa is 200 miles.\n\n\n"
    "Following the example above, generate answers to the questions below:\n\n")
COMPOSITE3_ROW0_QUESTIONS = (
    "[INST] The following paragraphs each describe a set of five objects arranged in a fixed order. The statements "
    "are logically consistent within each paragraph.\n\nOn a branch, there are five birds: a cardinal, a crow, a "
    "falcon, a robin, and a blue jay. The robin is to the right of the cardinal. The cardinal is to the right of the "
    "blue jay. The blue jay is the second from the left. The crow is the rightmost. Which choice is correct?\n"
    "choice: The cardinal is the third from the left.\nchoice: The crow is the third from the left.\nchoice: The "
    "falcon is the third from the left.\nchoice: The robin is the third from the left.\nchoice: The blue jay is the "
    "third from the left.\n [/INST]\n\n\n"
    "[INST] Given a short answer along with its context, select the most appropriate question which has the given "
    "short answer as its answer.\n\nHere is the short answer followed by the context.\nShort Answer: 89 Liberty Street "
    "in Manhattan Context: In late 1886 Tesla met Alfred S. Brown, a Western Union superintendent, and New York "
    "attorney Charles F. Peck. The two men were experienced in setting up companies and promoting inventions and "
    "patents for financial gain. Based on Tesla's patents and other ideas they agreed to back him financially and "
    "handle his patents. Together in April 1887 they formed the Tesla Electric Company with an agreement that "
    "profits from generated patents would go ⅓ to Tesla, ⅓ to Peck and Brown, and ⅓ to fund development. They set "
    "up a laboratory for Tesla at 89 Liberty Street in Manhattan where he worked on improving and developing new "
    "types of electric motors, generators and other devices.\n  choice: What will happen to the profits of this new "
    "company?\n  choice: What happened to tesla's new lab?\nChoose the appropriate question which has the given "
    "answer. [/INST]\n\n\n"
    "[INST] Q: Is anyone at the Last Supper celebrated in Islam?\nA: [/INST]\n\n")


@needs_bigbench
def test_golden_composite3_prompt():
    ds = build_composite("composite3", rows=200)
    assert len(ds) == 200 and ds[0]["subtasks"] == ["logical_deduction", "question_selection", "strategyqa"]
    assert composite_prefix(select("composite3")) == COMPOSITE3_PREFIX
    assert ds[0]["prompt"] == COMPOSITE3_PREFIX + COMPOSITE3_ROW0_QUESTIONS
    assert ds[0]["answers"][:2] == ["The cardinal is the third from the left.", "What happened to tesla's new lab?"]
    assert all(row["prompt"].startswith(COMPOSITE3_PREFIX) and row["prompt"].endswith(" [/INST]\n\n") for row in ds)


def _sorted_choices(prompt: str) -> str:
    lines = prompt.split("\n")
    choice = [i for i, x in enumerate(lines) if x.lstrip().startswith("choice:")]
    picked = sorted(lines[i] for i in choice)
    for i, x in zip(choice, picked):
        lines[i] = x
    return "\n".join(lines)


# MeteoRA's own prompts of these rows (its composite_10 test rows and fixed examples): the same text, choice lines
# in the same places and indentation; only BIG-bench's choice permutation (HF's stream) differs, so choice lines
# are compared as a set.
METEORA_PROMPTS = {
    ("goal_step_wikihow", "The most reasonable step of 'Get an Hourglass Figure'"):
        "[INST] Q: The most reasonable step of 'Get an Hourglass Figure' is \n  choice: Use a stability ball to work "
        "your hamstrings\n  choice: Use the military press to work out your shoulders and upper arms\n  choice: "
        "Practice flicking your wrist to achieve a perfect spiral\n  choice: Use the Kreg jig to start drilling your "
        "pocket holes\nA: [/INST]\n",
    ("question_selection", "Short Answer: 27.7 million tons Context: NASA's CALIPSO"):
        "[INST] Given a short answer along with its context, select the most appropriate question which has the "
        "given short answer as its answer.\n\nHere is the short answer followed by the context.\nShort Answer: 27.7 "
        "million tons Context: NASA's CALIPSO satellite has measured the amount of dust transported by wind from the "
        "Sahara to the Amazon: an average 182 million tons of dust are windblown out of the Sahara each year, at 15 "
        "degrees west longitude, across 1,600 miles (2,600 km) over the Atlantic Ocean (some dust falls into the "
        "Atlantic), then at 35 degrees West longitude at the eastern coast of South America, 27.7 million tons (15%) "
        "of dust fall over the Amazon basin, 132 million tons of dust remain in the air, 43 million tons of dust are "
        "windblown and falls on the Caribbean Sea, past 75 degrees west longitude.\n  choice: How far does saharan "
        "dust float through the atlantic ocean?\n  choice: What is the distance that dust moves through the atlantic "
        "ocean?\n  choice: How many tons of dust are already floating around in the atmosphere?\n  choice: Each "
        "year, how many tons of saharan dust fall on the amazon basin?\n  choice: How much dust is blown out of the "
        "sahara each year?\nChoose the appropriate question which has the given answer. [/INST]\n",
    ("logical_deduction", ("In an antique car show, there are three vehicles: a tractor, a truck, and a minivan. The "
                          "minivan is newer than the truck. The tractor is older than the truck.")):
        "[INST] The following paragraphs each describe a set of three objects arranged in a fixed order. The "
        "statements are logically consistent within each paragraph.\n\nIn an antique car show, there are three "
        "vehicles: a tractor, a truck, and a minivan. The minivan is newer than the truck. The tractor is older than "
        "the truck. Which choice is correct?\nchoice: The tractor is the second-newest.\nchoice: The truck is the "
        "second-newest.\nchoice: The minivan is the second-newest.\n [/INST]\n",
    ("winowhy", ("I can't cut that tree down with that axe; it is too small. The 'it' refers to the axe because The "
                "axe is smaller to cut the tree.")):
        "[INST] Please answer the following questions about which words certain pronouns refer to.\n\nI can't cut "
        "that tree down with that axe; it is too small. The 'it' refers to the axe because The axe is smaller to cut "
        "the tree.\nThe above reasoning is [/INST]\n",
    ("strategyqa", "Can Hulk's alter ego explain atomic events?"):
        "[INST] Q: Can Hulk's alter ego explain atomic events?\nA: [/INST]\n",
}


@needs_bigbench
@pytest.mark.parametrize(("task", "where"), list(METEORA_PROMPTS))
def test_golden_single_task_prompts_are_meteoras(task, where):
    """Per-task prompts as BIG-bench builds them: choices between the input and the output prefix with BIG-bench's
    indentation (goal_step_wikihow, question_selection), MeteoRA's own choice lines (logical_deduction), none where
    neither appends them (winowhy)."""
    want = METEORA_PROMPTS[(task, where)]
    n_choices = sum(line.lstrip().startswith("choice:") for line in want.split("\n"))
    hits = {_sorted_choices(r["prompt"]) for r in task_pool(task) if where in r["inputs"] and
            sum(line.lstrip().startswith("choice:") for line in r["prompt"].split("\n")) == n_choices}
    assert _sorted_choices(want) in hits


@needs_task_files
def test_composite10_has_ten_subtasks_and_is_capped_by_the_smallest_test_split():
    ds = build_composite("composite10", rows=500, shots=1)
    assert len(ds[0]["subtasks"]) == 10 and len(ds[0]["answers"]) == 10
    sizes = []  # each sub-task's test rows less its example row (on BIG-bench the smallest is news_commentary_de's)
    for name in select("composite10"):
        shot = {r["prompt"] for r in fixed_shots(name, 1)}
        sizes.append(sum(r["prompt"] not in shot for r in load_split(name, "test")))
    smallest, k = min(sizes), sizes.index(min(sizes))
    assert len(ds) == smallest  # the smallest sub-task test split (less an example row)
    sizes = [len(load_split(name, "test")) for name in select("composite10")]  # no example rows: whole splits
    smallest, k, longest = min(sizes), sizes.index(min(sizes)), sizes.index(max(sizes))
    cycled = build_composite("composite10", rows=smallest + 5, shots=0, repeat_short=True)
    assert len(cycled) == smallest + 5 and len(set(cycled["prompt"])) == smallest + 5
    assert cycled[smallest]["answers"][k] == cycled[0]["answers"][k]  # the smallest wraps around
    # each row names the test row each sub-task's question came from: the cycled one's repeat, the others' do not
    assert cycled[smallest]["sources"][k] == cycled[0]["sources"][k] == 0
    assert cycled[smallest]["sources"][longest] == smallest
    assert [r["sources"][longest] for r in cycled] == list(range(smallest + 5))


def test_bad_composite_input():
    with pytest.raises(LoramuxDataError, match=r"at least 2 sub-tasks"):
        build_composite(["strategyqa"], rows=3)
    with pytest.raises(LoramuxDataError, match=r"unknown task 'no_such_task'"):
        build_composite(["strategyqa", "no_such_task"], rows=3)


def test_a_prompt_skipped_as_too_long_is_no_row_of_the_composite_scores():
    """evaluate scores only the composite rows it generated (MeteoRA's N): a prompt over data.max_prompt_tokens
    (its text None) neither lowers attempts nor counts as a wrong answer to every sub-task, so the record's metrics
    are those of the rows the claims' intervals resample (claim_rows drops the same rows)."""
    from datasets import Dataset

    from data.batches import Generations
    from pipeline.stages.evaluate import _score_composite

    subtasks = ["winowhy", "strategyqa"]
    ds = Dataset.from_dict({"prompt": ["p0", "p1", "p2"], "answers": [["correct", "Yes. It is."]] * 3,
                            "subtasks": [subtasks] * 3, "sources": [[i, i] for i in range(3)]})
    texts = ["1. correct\n2. Yes.", None, "1. correct\n2. yes, it is"]
    g = Generations(texts=texts, routes=[None] * 3, ends=[None] * 3, skipped=1)
    metrics, lines, names, skipped, _ = _score_composite(2, subtasks, ds, g)
    assert metrics["rows"] == 2 and metrics["attempts"] == 2.0 and metrics["missing"] == 0
    assert metrics["winowhy/accuracy"] == 1.0 and metrics["strategyqa/accuracy"] == 1.0
    assert metrics["correct"] == 2.0 and metrics["main"] == 1.0 and skipped == 1 and names == subtasks
    assert [x["prediction"] for x in lines] == texts  # the skipped row is still listed, unscored
    assert [x["sources"] for x in lines] == [[0, 0], [1, 1], [2, 2]]  # the questions each row asked (clusters)

    none = Generations(texts=[None] * 3, routes=[None] * 3, ends=[None] * 3, skipped=3)
    metrics, lines, *_ = _score_composite(2, subtasks, ds, none)
    assert metrics["rows"] == 0 and metrics["attempts"] is None and metrics["main"] is None and len(lines) == 3
