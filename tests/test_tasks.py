"""Tasks: prompts fit the budget, needles are where the spans say, answers are in the prompt, scoring is exact."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from kvp_gym.tasks import TASKS, encode, get_task, make_sample
from kvp_gym.tasks.ruler import NEEDLE_TYPES, NeedleInAHaystack, niah_name

ORIGINAL = {
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "variable_tracking",
    "common_words",
    "frequent_words",
    "essay",
}
# RULER's needle value types for every niah kind, and key types for the single-answer kinds.
VARIANTS = {
    f"niah_{kind}_{values}"
    for kind in ("single", "multikey", "multivalue", "multiquery")
    for values in ("words", "uuids")
} | {
    f"niah_{kind}{values}_{keys}keys"
    for kind in ("single", "multikey")
    for values in ("", "_words", "_uuids")
    for keys in ("number", "uuid")
}
EXPECTED = ORIGINAL | VARIANTS
# What a needle key or value of each type looks like: words are adjective-noun compounds, with no digit.
_LOOKS = {
    "numbers": re.compile(r"[1-9]\d{6}"),
    "words": re.compile(r"[^\W\d_]+-[^\W\d_]+"),  # letters only ("jalapeño" is a noun)
    "uuids": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"),
}


def test_all_tasks_are_registered():
    assert set(TASKS) == EXPECTED and len(VARIANTS) == 20
    with pytest.raises(KeyError, match="unknown task 'nope'; available: common_words, essay"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("context", [1500, 3000])
def test_prompt_fits_the_budget_and_hides_what_it_asks(tiny, name, context):
    _, tokenizer = tiny
    task = get_task(name)
    sample = make_sample(task, tokenizer, context, seed=11)
    encoded = encode(tokenizer, sample)
    assert 0.85 * context <= len(encoded.ids) <= context
    assert make_sample(task, tokenizer, context, seed=11) == sample  # deterministic
    assert make_sample(task, tokenizer, context, seed=12) != sample
    for (start, end), (a, b) in zip(encoded.needle_spans, sample.needle_spans, strict=True):
        assert tokenizer.decode(encoded.ids[start:end]) == sample.prompt[a:b]
    if name.startswith("niah") or name == "variable_tracking":
        assert len(encoded.needle_spans) >= len(sample.answers) > 0
        hidden = " ".join(sample.prompt[a:b] for a, b in sample.needle_spans)
        assert all(answer in hidden for answer in sample.answers)
    if name in ("common_words", "frequent_words"):
        listing = sample.prompt.split("\n")[1].replace(".", " ").split()
        counts = {w: listing.count(w) for w in set(listing) if w.isalpha()}
        threshold = min(counts[a] for a in sample.answers)
        assert all(counts[w] < threshold for w in counts if w not in sample.answers)  # answers really are the top
    if name == "essay":
        assert not sample.chat and len(encoded.continuation_ids) >= 200 and sample.answers == ()
    else:
        assert sample.chat and sample.answer_prefix and encoded.ids[-1] != tokenizer.eos_token_id


def test_exact_match_scoring():
    task = get_task("niah_multivalue")
    answers = ("1234567", "7654321")
    assert task.score(" 1234567 and 7654321.", answers) == 1.0
    assert task.score(" 1234567, then 12345678", answers) == 0.5  # a longer number is not a match
    assert task.score("nothing here", answers) == 0.0
    assert get_task("common_words").score("Answer: Apple, pear", ("apple", "pear", "plum")) == pytest.approx(2 / 3)
    assert get_task("essay").score("anything", ()) == 1.0


def test_too_small_a_budget_is_an_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match="even the smallest prompt exceeds 50 tokens"):
        make_sample(get_task("niah_multiquery"), tokenizer, 50, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_prompts_fit_with_the_real_tokenizer(smollm2, name):
    _, tokenizer = smollm2
    sample = make_sample(get_task(name), tokenizer, 1024, seed=5)
    encoded = encode(tokenizer, sample)
    assert 0.9 * 1024 <= len(encoded.ids) <= 1024
    for (start, end), (a, b) in zip(encoded.needle_spans, sample.needle_spans, strict=True):
        assert sample.prompt[a:b] in tokenizer.decode(encoded.ids[start:end])


def test_text_pools_split_essays_and_words(tiny):
    from kvp_gym.tasks.text import essay_sentences, words

    for kind in ("noun", "adjective"):
        train, heldout = set(words(kind, "train")), set(words(kind, "heldout"))
        assert not train & heldout and train | heldout == set(words(kind))
        assert len(heldout) == pytest.approx(len(words(kind)) / 5, abs=1)
    train, heldout = essay_sentences("train"), essay_sentences("heldout")
    assert len(heldout) > 0.1 * len(essay_sentences()) and len(train) + len(heldout) == len(essay_sentences())
    # "val" and "test" halve "heldout": final test sets draw on text that no validation set saw.
    for kind in ("noun", "adjective"):
        val, test = set(words(kind, "val")), set(words(kind, "test"))
        assert val and test and not val & test and val | test == set(words(kind, "heldout"))
    val, test = essay_sentences("val"), essay_sentences("test")
    assert len(test) > 0.3 * len(heldout) and abs(len(val) + len(test) - len(heldout)) <= 1  # one joint sentence
    assert not set(val) & set(test)
    with pytest.raises(ValueError, match="unknown text pool 'validation'"):
        words("noun", "validation")
    # A held-out needle uses held-out words and a held-out haystack.
    _, tokenizer = tiny
    sample = make_sample(get_task("niah_single"), tokenizer, 3000, seed=3, pool="heldout")
    adjective, noun = sample.metadata["keys"][0].split("-")
    assert adjective in words("adjective", "heldout") and noun in words("noun", "heldout")
    only_train = set(train) - set(heldout)
    assert any(s in sample.prompt for s in heldout if len(s) > 40)
    assert not any(s in sample.prompt for s in only_train if len(s) > 40)
    assert sample != make_sample(get_task("niah_single"), tokenizer, 3000, seed=3, pool="train")


def test_common_words_on_the_held_out_pools(tiny):
    """The held-out pools hold fewer nouns than common_words used to draw (2048): they build from what they have,
    and a prompt they cannot fill is a clear error, not a silently shorter prompt."""
    from kvp_gym.tasks.text import words

    _, tokenizer = tiny
    task = get_task("common_words")
    for pool in ("heldout", "val", "test"):
        sample = make_sample(task, tokenizer, 1024, seed=5, pool=pool)
        assert set(sample.answers) <= set(words("noun", pool)) and len(set(sample.answers)) == 10
        assert len(tokenizer(sample.prompt)["input_ids"]) > 700  # filled, not cut short by the pool
    with pytest.raises(ValueError, match="the text pool 'val' has words for prompts of at most .* tokens, not 20000"):
        make_sample(task, tokenizer, 20000, seed=5, pool="val")
    with pytest.raises(ValueError, match="a list of 3000 words needs 1510 distinct nouns, the text pool 'val' has"):
        task.build(5, 3000, "val")


# Digests of the original tasks' samples, computed before the needle value and key types were added: shipped
# traces, agents and committed results depend on these prompts, so they must never change.
_PINNED_CASES = [(0, 3, "all"), (7, 60, "all"), (123, 400, "train"), (5, 150, "heldout")]
_PINNED = {
    "niah_single": ["52c6490f24063278", "92488ab59dcd7189", "12c7eb7d2f01dd18", "bb6cedb7b1ed9157"],
    "niah_multikey": ["7b77a551d94e73e7", "1d206f6a601c7659", "31f67fdb50060418", "c8e454b5bd4668f2"],
    "niah_multivalue": ["b6193a5b74909533", "598249245d24d7ff", "683b14122998d4ee", "d49faa70b290389f"],
    "niah_multiquery": ["1fcee71642569d6a", "ab00287cb2d3891d", "4c8f4dde20ff3b56", "f822b1ed0d0b8614"],
    "variable_tracking": ["f8c342106636ee07", "0e217393d5735499", "d202b474edf2fda2", "0008aed34e5bd0cf"],
    "common_words": ["267bdc3bbb8c5347", "792726da2a64c49d", "67d9d2e32cdcab57", None],  # held-out: crashed before
    "frequent_words": ["75177c3417c8b51e", "8374ea3ad1daa6f9", "93203beb57e35b77", "ba99192b30c8231d"],
    "essay": ["0f2ad2c07f282963", "2964821004663b70", "f4e0d8a677be28e7", "5e5d0d050fe23c65"],
}


def _digest(sample) -> str:
    blob = json.dumps(
        [
            sample.prompt,
            sample.answer_prefix,
            list(sample.answers),
            [list(span) for span in sample.needle_spans],
            sample.metadata,
            sample.chat,
            sample.continuation,
        ],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(_PINNED))
def test_original_tasks_build_the_same_samples_as_ever(name):
    task = get_task(name)
    for (seed, size, pool), expected in zip(_PINNED_CASES, _PINNED[name], strict=True):
        if expected is not None:
            assert _digest(task.build(seed, size, pool)) == expected, (name, seed, size, pool)


def _occurrences(value: str, text: str) -> int:
    """How often ``value`` occurs in ``text`` as a whole (hyphenated) word."""
    return len(re.findall(rf"(?<![\w-]){re.escape(value)}(?![\w-])", text))


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if n.startswith("niah")))
def test_needle_value_and_key_types(name):
    """Over many seeds and sizes: keys and values have the task's types, every one is distinct and hidden exactly
    once, the wording names the value type, and word values and word keys put no digit in the needles."""
    task = get_task(name)
    kind = "_".join(name.split("_")[:2])
    assert isinstance(task, NeedleInAHaystack) and niah_name(kind, task.value_type, task.key_type) == name
    one, many = NEEDLE_TYPES[task.value_type]
    others = [NEEDLE_TYPES[t][1] for t in NEEDLE_TYPES if t != task.value_type]
    for seed in range(40):
        sample = task.build(seed, size=seed % 7 + 1, pool=("all", "train", "heldout")[seed % 3])
        keys = sample.metadata["keys"]
        assert len(keys) == task.num_keys and all(_LOOKS[task.key_type].fullmatch(k) for k in keys)
        assert len(sample.answers) == task.num_queries * task.num_values
        assert all(_LOOKS[task.value_type].fullmatch(v) for v in sample.answers)
        needles = [sample.prompt[a:b] for a, b in sample.needle_spans]
        assert all(n.startswith(f"The special magic {one} for ") for n in needles)
        asked = f"special magic {many if len(sample.answers) > 1 else one} for "
        assert sample.prompt.startswith(f"Some special magic {many} are hidden")
        assert asked in sample.prompt.split("\n")[-1] and sample.answer_prefix.startswith(f"The {asked}")
        assert not any(f"special magic {word}" in sample.prompt for word in others)
        if task.value_type != "numbers" or task.key_type != "words":  # the original tasks may repeat a number
            assert len(set(sample.answers) | set(keys)) == len(sample.answers) + len(keys)
            assert all(_occurrences(v, sample.prompt) == 1 for v in sample.answers)
        assert all(any(v in n for n in needles) for v in sample.answers)
        if task.value_type == "words" and task.key_type == "words":
            assert not any(c.isdigit() for n in needles for c in n)


def test_word_and_uuid_answers_match_exactly():
    words, uuids = get_task("niah_single_words"), get_task("niah_multivalue_uuids")
    assert words.score(" Tall-Tree.", ("tall-tree",)) == 1.0  # case-insensitive, as every task
    assert words.score(" tall-tree-house", ("tall-tree",)) == 0.0  # a longer hyphenated word is another word
    assert words.score(" very-tall-tree", ("tall-tree",)) == 0.0
    assert words.score(" tall tree", ("tall-tree",)) == 0.0
    a, b = "e3e70682-c209-4cac-a29f-6fbed82c0cd2", "8a7d43b5-7863-4074-b797-0386fee29476"
    assert uuids.score(f"- {a.upper()}\n- {b[:-1]}", (a, b)) == 0.5  # a UUID one character short is wrong
    assert uuids.score(f"- {a}\n- {b}7", (a, b)) == 0.5
    assert uuids.score("", ()) == 1.0
    # Number values keep the original scorer: a hyphen ends a number.
    assert get_task("niah_single").score(" 1234567-8", ("1234567",)) == 1.0


def test_unknown_needle_type_is_an_error():
    with pytest.raises(ValueError, match="unknown needle type 'letters'"):
        NeedleInAHaystack(name="bad", value_type="letters")
    with pytest.raises(ValueError, match="unknown needle type 'dates'"):
        NeedleInAHaystack(name="bad", key_type="dates")


def test_gemma_full_cache_table_matches_its_outputs():
    """docs/tasks.md's Gemma 3 270M table quotes, per task and length, the score (or essay perplexity) that the
    `kvp-gym tasks eval` outputs committed beside it record: the two cannot drift apart."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    recorded = {}
    for name in ("tasks-gemma3-270m.json", "tasks-gemma3-270m-long.json"):
        for row in json.loads((docs / name).read_text())["results"]:
            quoted_as = f"{row['perplexity']:.1f}" if row["task"] == "essay" else f"{row['score']:.2f}"
            recorded[row["task"], row["context"]] = quoted_as
    section = (docs / "tasks.md").read_text().split("## Full-cache results of Gemma 3 270M")[1]
    header = next(line for line in section.splitlines() if line.startswith("| task |"))
    contexts = [int(cell.strip().removesuffix("k")) * 1024 for cell in header.strip("|").split("|")[1:5]]
    quoted = {}
    for line in section.splitlines():
        if match := re.match(r"\| `(\w+)` \|(.*)", line):
            cells = [cell.strip().removeprefix("perplexity ") for cell in match[2].split("|")[:4]]
            quoted.update({(match[1], context): cell for context, cell in zip(contexts, cells, strict=True)})
    assert contexts == [1024, 4096, 8192, 16384] and len(quoted) == 44
    assert quoted == recorded
