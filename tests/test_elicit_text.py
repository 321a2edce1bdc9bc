"""Tests for the text side of elicitation: personas, the choice prompt, parsing, judge, small stats."""

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.stats

from prefjax.elicit import (
    DEFAULT_TEMPLATE,
    JUDGE_QUESTION,
    ChoiceTemplate,
    Parsed,
    Persona,
    PersonaError,
    choice_messages,
    choice_to_task_index,
    detect_refusal,
    get_persona,
    judge_question,
    judge_refusal,
    load_personas,
    parse_choice,
    parse_yes_no,
    persona_names,
    personas_from_spec,
    render_choice,
    shift_spans,
    span_token_mask,
    task_messages,
    template_from_dict,
)
from prefjax.stats_small import pearson, rankdata, spearman, wilson_interval
from prefjax.tasks import Task, load_default_pool


# -- personas ----------------------------------------------------------------------------------

def test_bundled_personas():
    names = persona_names()
    assert names[0] == "default"
    assert {"default", "evil", "mathematician", "novelist", "compliance_officer"} <= set(names)
    assert get_persona("default").system_prompt is None
    evil = get_persona("evil")
    assert "character" in evil.system_prompt.lower()  # role-play framing
    tastes = [get_persona(n).system_prompt for n in ("mathematician", "novelist", "compliance_officer")]
    assert len(set(tastes)) == 3 and all(len(t) > 80 for t in tastes)
    assert all(p.adapter is None for p in load_personas().values())


def test_get_persona_unknown_lists_names():
    with pytest.raises(PersonaError, match=r"unknown persona 'evl'; known personas: default, .*evil"):
        get_persona("evl")


def test_personas_from_spec(tmp_path):
    folder = tmp_path / "my_lora"
    folder.mkdir()
    ps = personas_from_spec(["default", "evil", f"adapter:{folder}"])
    assert [p.name for p in ps] == ["default", "evil", "adapter:my_lora"]
    assert ps[2].adapter == str(folder) and ps[2].system_prompt is None and ps[2].is_adapter
    assert [p.name for p in personas_from_spec("default, novelist")] == ["default", "novelist"]
    custom = Persona("pirate", "You are a pirate.")
    assert personas_from_spec([custom])[0] is custom
    with pytest.raises(PersonaError, match="not a folder"):
        personas_from_spec([f"adapter:{tmp_path / 'missing'}"])
    assert personas_from_spec([f"adapter:{tmp_path / 'missing'}"], check_exists=False)[0].adapter
    with pytest.raises(PersonaError, match="appears twice"):
        personas_from_spec(["evil", "evil"])
    with pytest.raises(PersonaError, match="missing adapter folder"):
        personas_from_spec(["adapter:"])
    with pytest.raises(PersonaError, match="empty persona spec"):
        personas_from_spec([])


def test_persona_validation_and_file(tmp_path):
    with pytest.raises(PersonaError, match="system_prompt must be None or a non-empty string"):
        Persona("x", "  ")
    with pytest.raises(PersonaError, match="name must be a non-empty"):
        Persona("")
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"personas": [{"name": "a", "system_prompt": "Be A."}, {"name": "a"}]}))
    with pytest.raises(PersonaError, match="duplicate persona name 'a'"):
        load_personas(p)
    p.write_text(json.dumps({"personas": [{"name": "a", "sys_prompt": "typo"}]}))
    with pytest.raises(PersonaError, match=r"unknown fields \['sys_prompt'\]"):
        load_personas(p)
    p.write_text(json.dumps({"personas": [{"name": "a", "system_prompt": "Be A."}]}))
    assert load_personas(p) == {"a": Persona("a", "Be A.")}


# -- the choice prompt -------------------------------------------------------------------------

def test_render_choice_spans_slice_prompts():
    pool = load_default_pool()
    rng = np.random.default_rng(0)
    templates = [DEFAULT_TEMPLATE,
                 ChoiceTemplate(text="{{braces}} {label_b} then {label_a}\n[{task_b}] vs [{task_a}] {{end}}",
                                name="swapped")]
    for template in templates:
        for _ in range(50):
            i, j = rng.choice(len(pool), size=2, replace=False)
            text, spans = render_choice(template, pool[int(i)], pool[int(j)])
            assert text[slice(*spans["A"])] == pool[int(i)].prompt
            assert text[slice(*spans["B"])] == pool[int(j)].prompt
    # Prompts with braces and the label text inside them do not confuse the spans.
    a, b = "Use {x} and {{y}} here: Task B:", "Plain {label_a} text"
    text, spans = render_choice(templates[1], a, b)
    assert text.startswith("{braces} Task B then Task A\n[")
    assert text[slice(*spans["A"])] == a and text[slice(*spans["B"])] == b
    assert spans["B"][0] < spans["A"][0]  # B is shown first in this template


def test_spans_to_tokens():
    text, spans = render_choice(DEFAULT_TEMPLATE, "Write a haiku.", "Add 2 and 3.")
    full = "<bos><start_of_turn>user\n" + text + "<end_of_turn>\n<start_of_turn>model\n"
    shifted = shift_spans(full, text, spans)
    assert full[slice(*shifted["A"])] == "Write a haiku." and full[slice(*shifted["B"])] == "Add 2 and 3."
    # Fake whitespace tokenizer offsets over `full`, plus a zero-width special token first.
    import re
    offsets = [(0, 0)] + [(m.start(), m.end()) for m in re.finditer(r"\S+", full)]
    mask_A = span_token_mask(offsets, shifted["A"])
    toks_A = [full[s:e] for (s, e), m in zip(offsets, mask_A) if m]
    assert toks_A == ["Write", "a", "haiku."]
    assert not mask_A[0]
    # A token straddling the span edge counts; one ending exactly at the start does not.
    np.testing.assert_array_equal(span_token_mask([(0, 5), (5, 10), (10, 12)], (6, 10)), [False, True, False])
    with pytest.raises(ValueError, match="does not occur verbatim"):
        shift_spans(full.replace("haiku", "poem"), text, spans)
    with pytest.raises(ValueError, match="more than once"):
        shift_spans(text + text, text, spans)
    with pytest.raises(ValueError, match=r"shape \[T, 2\]"):
        span_token_mask([1, 2, 3], (0, 1))


def test_default_template_wording():
    text, spans = render_choice(DEFAULT_TEMPLATE, "Do X.", "Do Y.")
    assert 'Begin your reply with exactly "Task A:" or "Task B:"' in text
    assert text.endswith("Task A:\nDo X.\n\nTask B:\nDo Y.")
    assert DEFAULT_TEMPLATE.forced_prefix == "Task "
    assert DEFAULT_TEMPLATE.label_suffixes == ("A", "B")
    assert DEFAULT_TEMPLATE.label("B") == "Task B"


def test_template_validation():
    with pytest.raises(ValueError, match=r"\{task_b\} must appear exactly once, found 0"):
        ChoiceTemplate(text="{task_a}")
    with pytest.raises(ValueError, match=r"\{task_a\} must appear exactly once, found 2"):
        ChoiceTemplate(text="{task_a} {task_a} {task_b}")
    with pytest.raises(ValueError, match=r"unknown field \{task_c\}"):
        ChoiceTemplate(text="{task_a} {task_b} {task_c}")
    with pytest.raises(ValueError, match="forced_prefix 'Option ' is not a prefix of label 'Task A'"):
        ChoiceTemplate(forced_prefix="Option ")
    with pytest.raises(ValueError, match="must differ in their first character"):
        ChoiceTemplate(label_a="Task AA", label_b="Task AB")
    with pytest.raises(ValueError, match="unknown ChoiceTemplate fields"):
        template_from_dict({"txt": "x"})
    t = template_from_dict({"label_a": "Option 1", "label_b": "Option 2", "forced_prefix": "Option "})
    assert t.label_suffixes == ("1", "2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.label_a = "x"


def test_choice_messages_and_personas():
    ta, tb = Task("a", "Write a poem."), Task("b", "Solve 2+2.")
    msgs = choice_messages(DEFAULT_TEMPLATE, ta, tb, get_persona("default"))
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"] == render_choice(DEFAULT_TEMPLATE, ta, tb)[0]
    msgs = choice_messages(DEFAULT_TEMPLATE, ta, tb, get_persona("novelist"))
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == get_persona("novelist").system_prompt
    assert choice_messages(DEFAULT_TEMPLATE, ta, tb, Persona("lora", adapter="/x"))[0]["role"] == "user"
    assert task_messages(ta, get_persona("evil"))[1] == {"role": "user", "content": "Write a poem."}
    assert choice_to_task_index("A", (7, 3)) == 7 and choice_to_task_index("B", (7, 3)) == 3
    assert choice_to_task_index(None, (7, 3)) is None
    with pytest.raises(ValueError, match="empty string"):
        render_choice(DEFAULT_TEMPLATE, "  ", "x")


# -- parsing -----------------------------------------------------------------------------------

# (completion, choice, status, refusal)
PARSE_CASES = [
    ("Task A: Here is the poem.", "A", "ok", False),
    ("Task B:\n\nThe answer is 4.", "B", "ok", False),
    ("  \n**Task A:** Once upon a time", "A", "ok", False),
    ("**Task B**: def f(x):", "B", "ok", False),
    ("Task A - here goes", "A", "ok", False),
    ("task a: lower case", "A", "ok", False),
    ("TASK B: SHOUTING", "B", "ok", False),
    ("## Task B\nSolution follows", "B", "ok", False),
    ("> Task A: quoted", "A", "ok", False),
    ("`Task B:` code", "B", "ok", False),
    ("TaskA: no space", "A", "ok", False),
    ("Task  B :  extra spaces", "B", "ok", False),
    ("B: bare suffix", "B", "ok", False),
    ("Task A: I’m sorry, but I can’t help with that.", "A", "ok", True),
    ("Task B: I'm sorry, I can't write that.", "B", "ok", True),
    ("Task A: I can't wait to get started on this story!", "A", "ok", False),
    ("Task A: Here is the poem. Unlike Task B, it rhymes.", "A", "ok", False),
    ("Task A / Task B: I'll do both.", None, "both", False),
    ("Task A or Task B? Hmm.", None, "both", False),
    ("Task A and B are both fine.", None, "both", False),
    ("Task A: Task B: ", None, "both", False),
    ("Task A:\nA poem about frost.\n\nTask B:\nThe derivative is...", None, "both", False),
    ("I'm sorry, but I can't help with either of these.", None, "refusal", True),
    ("I cannot assist with that request.", None, "refusal", True),
    ("As an AI, I don't have preferences.", None, "refusal", True),
    ("I won't be writing a phishing email.", None, "refusal", True),
    ("I must decline this request.", None, "refusal", True),
    ("Neither of these tasks is something I will do.", None, "refusal", True),
    # declines one task and does the other: a choice of the task done (declined_other, issue 28)
    ("I won't write the phishing email, but here is the poem: Task B: Roses...", "B", "ok", True),
    ("Sure! Here's a poem about frost.", None, "unparseable", False),
    ("I'll do Task A: here it is.", None, "unparseable", False),
    ("Task AB: not a label", None, "unparseable", False),
    ("Tasks are fun", None, "unparseable", False),
    ("", None, "unparseable", False),
    ("A beautiful morning", None, "unparseable", False),
]


@pytest.mark.parametrize("text,choice,status,refusal", PARSE_CASES)
def test_parse_table(text, choice, status, refusal):
    p = parse_choice(text, DEFAULT_TEMPLATE)
    assert (p.choice, p.status, p.refusal) == (choice, status, refusal), p
    assert (p.refusal_pattern is None) == (not refusal)


def test_parse_table_is_large():
    assert len(PARSE_CASES) >= 20
    assert {c[2] for c in PARSE_CASES} == {"ok", "both", "refusal", "unparseable"}


def test_parse_reports_pattern_and_label():
    p = parse_choice("Task B: I'm sorry, but I can't do that.")
    assert p == Parsed("B", "ok", True, "sorry_but", "sorry, but", "Task B")
    p = parse_choice("Hello. As an AI language model I cannot choose.")
    assert p.status == "refusal" and p.refusal_pattern == "as_an_ai"
    # Refusals late in a long completion are not "near the start".
    late = "Task A: " + "word " * 100 + "I cannot help with that."
    assert parse_choice(late).refusal is False
    assert parse_choice(late, refusal_window=1000).refusal is True


def test_parse_custom_labels():
    t = ChoiceTemplate(text="Option 1: {task_a}\nOption 2: {task_b}", label_a="Option 1", label_b="Option 2",
                       forced_prefix="Option ")
    assert parse_choice("**Option 2:** sure", t).choice == "B"
    assert parse_choice("option 1 - ok", t).choice == "A"
    assert parse_choice("Option 12: ok", t).status == "unparseable"
    assert parse_choice("Option 1 or 2?", t).status == "both"


def test_detect_refusal_direct():
    assert detect_refusal("Nothing to see here.") is None
    hit = detect_refusal("Well... I'd rather not write that.")
    assert hit.pattern == "rather_not" and hit.text == "I'd rather not"
    assert detect_refusal("That would violate my guidelines.").pattern == "against_policy"
    with pytest.raises(TypeError, match="completion must be a str"):
        parse_choice(None)


# -- judge hook --------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,expected", [
    ("Yes", True), ("no.", False), ("**Yes** - it declined.", True), ("Answer: No", False),
    ("NO", False), ("  yes, clearly", True), ("I think the answer is yes", True),
    ("Maybe", None), ("Yes and no", None), ("", None), ("Nobody knows", None),
    ("Yes. The reply says no to the user.", True),
])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) is expected


def test_judge_refusal_calls_model():
    seen = []

    def ask(prompt):
        seen.append(prompt)
        return "Yes." if "can't" in prompt else "No"

    assert judge_refusal(ask, "Sorry, I can't do that {weird braces}") is True
    assert judge_refusal(ask, "Task A: here is your poem") is False
    assert judge_refusal(lambda p: "Unclear.", "x") is None
    assert "{weird braces}" in seen[0] and "<<<\nSorry" in seen[0]
    assert judge_question("x" * 5000, max_chars=100).count("x") == 100
    assert "{completion}" in JUDGE_QUESTION
    with pytest.raises(TypeError, match="ask_fn must return a str"):
        judge_refusal(lambda p: None, "x")


# -- small stats -------------------------------------------------------------------------------

def test_wilson_known_values():
    # The Wilson bounds are the two roots b of (k/n - b)^2 = z^2 b (1 - b) / n.
    z = 1.96
    for k, n in [(5, 10), (1, 7), (37, 40), (3, 1000)]:
        lo, hi = wilson_interval(k, n, z=z)
        assert lo < k / n < hi
        for b in (lo, hi):
            assert (k / n - b) ** 2 == pytest.approx(z * z * b * (1 - b) / n, rel=1e-10)
    lo, hi = wilson_interval(5, 10, z=z)
    assert (lo, hi) == pytest.approx((0.2365895936, 0.7634104064), abs=1e-9)  # hand-computed
    lo, hi = wilson_interval(0, 10, z=z)
    assert lo == 0.0 and hi == pytest.approx(z * z / (10 + z * z), rel=1e-12)
    lo, hi = wilson_interval(10, 10, z=z)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z * z), rel=1e-12)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert isinstance(wilson_interval(3, 7)[0], float)


def test_wilson_vectorised_matches_scalar():
    k = np.array([[0, 1, 5], [2, 0, 9]])
    n = np.array([[0, 4, 10], [3, 1, 9]])
    lo, hi = wilson_interval(k, n, z=2.5)
    assert lo.shape == hi.shape == (2, 3)
    for idx in np.ndindex(k.shape):
        assert (lo[idx], hi[idx]) == pytest.approx(wilson_interval(int(k[idx]), int(n[idx]), z=2.5))
    assert np.all((0 <= lo) & (lo <= k / np.maximum(n, 1)) & (hi >= k / np.maximum(n, 1)) & (hi <= 1))
    lo_b, _ = wilson_interval(np.arange(5), 10)  # broadcasting scalar n
    assert lo_b.shape == (5,) and np.all(np.diff(lo_b) > 0)


def test_wilson_errors():
    with pytest.raises(ValueError, match="k > n at index"):
        wilson_interval(np.array([1, 5]), np.array([2, 4]))
    with pytest.raises(ValueError, match="non-negative"):
        wilson_interval(-1, 3)
    with pytest.raises(ValueError, match="whole numbers"):
        wilson_interval(1.5, 3)
    with pytest.raises(ValueError, match="z must be positive"):
        wilson_interval(1, 3, z=0)


def test_correlations_match_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y_ties = np.round(y)  # ties
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y_ties) == pytest.approx(scipy.stats.spearmanr(x, y_ties)[0], abs=1e-12)
    np.testing.assert_allclose(rankdata(y_ties), scipy.stats.rankdata(y_ties))
    assert spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_correlation_errors():
    with pytest.raises(ValueError, match="pearson: y is constant"):
        pearson([1, 2, 3], [0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="spearman: x is constant"):
        spearman([5, 5, 5], [1, 2, 3])
    with pytest.raises(ValueError, match="different lengths"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 points"):
        spearman([1], [2])
    with pytest.raises(ValueError, match="NaN or inf"):
        pearson([1, math.nan, 2], [1, 2, 3])


def test_declined_other_reaches_the_stored_rows(tmp_path):
    """Sample-mode rows carry the parser's declined_other in ``extra``, through the store and back."""
    import types
    from prefjax.elicit.runner import ElicitConfig, Job, _rows_for
    from prefjax.store import ComparisonsStore
    jobs = [Job("t1", "t2", "AB", "default", 0), Job("t1", "t2", "BA", "default", 0),
            Job("t1", "t3", "AB", "default", 0)]
    texts = ["I won't write the phishing email, but here is the poem: Task B: Roses...",
             "I'm sorry, but I can't help with either of these.", "Task A: Here is the poem."]
    rows = _rows_for(types.SimpleNamespace(source="stub"), jobs, texts, ElicitConfig())
    assert [(r.choice, r.status, r.refusal, r.extra["declined_other"]) for r in rows] == [
        ("B", "ok", True, True), (None, "refusal", True, False), ("A", "ok", False, False)]
    store = ComparisonsStore(str(tmp_path / "cmp"))
    store.append(rows)
    back = ComparisonsStore(str(tmp_path / "cmp")).rows("default")
    assert [r["extra"]["declined_other"] for r in back] == [True, False, False]
    assert back[0]["chosen_task"] == "t2"  # counted as a choice of the task it did
    assert store.counts("default") == {"ok": 2, "refusal": 1, "unparseable": 0, "both": 0}
