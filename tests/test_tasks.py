"""Tests for prefjax.tasks: pools, the bundled default pool and file loaders."""

import collections
import json
import os

import numpy as np
import pytest

from prefjax.tasks import (
    TOPICS,
    Task,
    TaskFileError,
    TaskPool,
    detect_format,
    load_default_pool,
    load_tasks,
    save_jsonl,
)

DATASETS = "/work/shared/datasets"


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _small_pool():
    return TaskPool([
        Task("a1", "alpha one", "x", "s"),
        Task("b1", "beta one", "y", "s"),
        Task("a2", "alpha two", "x", "s"),
        Task("c1", "gamma one", "z", "s"),
        Task("b2", "beta two", "y", "s"),
        Task("a3", "alpha three", "x", "s"),
    ])


# -- Task / TaskPool ---------------------------------------------------------------------------

def test_task_validation():
    with pytest.raises(ValueError, match="empty prompt"):
        Task("t1", "   ")
    with pytest.raises(TypeError, match="Task.prompt must be a str"):
        Task("t1", 3)
    with pytest.raises(ValueError, match="id must be non-empty"):
        Task("", "hi")
    t = Task("t1", "hi", "x", "s")
    with pytest.raises(dataclasses_frozen_error()):
        t.prompt = "other"


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_pool_basics():
    pool = _small_pool()
    assert len(pool) == 6
    assert pool[0].id == "a1" and pool[-1].id == "a3"
    assert pool["c1"].prompt == "gamma one"
    assert pool.index("b2") == 4
    assert pool.topics == ("x", "y", "z")
    assert "a2" in pool and "zz" not in pool
    assert isinstance(pool[1:3], TaskPool) and pool[1:3].ids == ("b1", "a2")
    np.testing.assert_array_equal(pool.topic_array(), [0, 1, 0, 2, 1, 0])
    with pytest.raises(KeyError, match="no task with id 'nope'"):
        pool.index("nope")
    with pytest.raises(KeyError, match="nope"):
        pool["nope"]
    with pytest.raises(ValueError, match="duplicate task id 'a1' at positions 0 and 1"):
        TaskPool([Task("a1", "p"), Task("a1", "q")])
    with pytest.raises(TypeError, match="item 0"):
        TaskPool([{"id": "a"}])


def test_by_topic_and_filter():
    pool = _small_pool()
    groups = pool.by_topic()
    assert list(groups) == ["x", "y", "z"]
    assert groups["x"].ids == ("a1", "a2", "a3")
    assert groups["y"].ids == ("b1", "b2")
    assert pool.filter(topics=["z", "y"]).ids == ("b1", "c1", "b2")
    assert pool.filter(ids=["a3", "b1"]).ids == ("b1", "a3")  # pool order kept
    with pytest.raises(ValueError, match="unknown topics \\['w'\\]"):
        pool.filter(topics=["w"])
    with pytest.raises(ValueError, match="unknown task ids"):
        pool.filter(ids=["q"])


def test_subset_stratified_and_deterministic():
    pool = load_default_pool()
    sub = pool.subset(110, seed=3)
    assert len(sub) == 110
    counts = collections.Counter(t.topic for t in sub)
    assert set(counts) == set(TOPICS)
    # Proportional allocation: each topic has 31 or 32 tasks of 345, so 10 each of 110.
    assert all(v == 10 for v in counts.values()), counts
    # Original order kept, deterministic, seed matters.
    assert [pool.index(i) for i in sub.ids] == sorted(pool.index(i) for i in sub.ids)
    assert pool.subset(110, seed=3) == sub
    assert pool.subset(110, seed=4) != sub
    flat = pool.subset(50, seed=0, stratified=False)
    assert len(flat) == 50 and len(set(flat.ids)) == 50
    assert pool.subset(len(pool), seed=1) == pool
    assert len(pool.subset(0)) == 0
    with pytest.raises(ValueError, match="subset size n=400"):
        pool.subset(400)


def test_subset_stratified_uneven():
    pool = _small_pool()  # topics x:3, y:2, z:1
    sub = pool.subset(3, seed=0)
    counts = collections.Counter(t.topic for t in sub)
    assert counts == {"x": 2, "y": 1}  # quotas 1.5, 1.0, 0.5 -> largest remainder: x first (tie, topic order)


def test_records_round_trip():
    pool = _small_pool()
    assert TaskPool.from_records(pool.to_records()) == pool


# -- default pool --------------------------------------------------------------------------------

def test_default_pool_contents():
    pool = load_default_pool()
    assert len(pool) >= 330
    counts = collections.Counter(t.topic for t in pool)
    assert set(counts) == set(TOPICS)
    assert pool.topics == TOPICS
    assert min(counts.values()) >= 30, counts
    assert len(set(pool.ids)) == len(pool)
    assert all(t.prompt.strip() == t.prompt and t.prompt for t in pool)
    assert all(t.source == "prefjax-default" for t in pool)
    assert len(set(t.prompt.lower() for t in pool)) == len(pool)  # no duplicated prompts
    # Short tasks: the longest (summaries quote a passage) stays under 300 characters.
    assert max(len(t.prompt) for t in pool) < 300
    # Ids carry a per-topic prefix and a zero-padded counter.
    prefixes = {t.topic: t.id.split("-")[0] for t in pool}
    assert len(set(prefixes.values())) == len(TOPICS)
    assert pool["fic-001"].topic == "fiction"
    assert "phishing" in pool["harm-001"].prompt


# -- loaders: round trip and formats ---------------------------------------------------------------

def test_jsonl_round_trip(tmp_path):
    pool = _small_pool()
    path = tmp_path / "pool.jsonl"
    save_jsonl(pool, path)
    assert load_tasks(path) == pool
    assert detect_format(path) == "jsonl"
    # And the default pool survives a round trip too.
    default = load_default_pool()
    save_jsonl(default, tmp_path / "d.jsonl")
    assert load_tasks(tmp_path / "d.jsonl") == default


def test_jsonl_text_field_and_defaults(tmp_path):
    p = _write(tmp_path / "t.jsonl",
               '{"id": "x1", "text": "  hello  "}\n\n{"id": 7, "prompt": "world", "topic": "greet"}\n')
    pool = load_tasks(p)
    assert pool.ids == ("x1", "7")
    assert pool["x1"] == Task("x1", "hello", "unknown", "t")
    assert pool["7"].topic == "greet"
    assert load_tasks(p, source="mine", default_topic="misc")["x1"] == Task("x1", "hello", "misc", "mine")


def test_unicode_line_separator_inside_strings(tmp_path):
    # U+2028 is legal raw inside JSON strings; str.splitlines() would cut the record in two.
    p = _write(tmp_path / "u.jsonl", '{"id": "a", "text": "one\u2028two"}\n{"id": "b", "text": "x"}\n')
    pool = load_tasks(p)
    assert pool["a"].prompt == "one\u2028two" and len(pool) == 2
    p2 = _write(tmp_path / "u.csv", "content,category\nthree\u2028four,c\nfive,c\n")
    assert load_tasks(p2).prompts == ("three\u2028four", "five")


def test_json_array_of_records(tmp_path):
    p = _write(tmp_path / "t.json", json.dumps([{"id": "a", "prompt": "p1"}, {"id": "b", "text": "p2"}], indent=1))
    assert load_tasks(p).prompts == ("p1", "p2")


def test_csv_loader(tmp_path):
    p = _write(tmp_path / "b.csv",
               'content,subcategory,category\n'
               '"Multi-line\nprompt, with comma",sub,Cat1\n'
               'Second one,sub,Cat2\n'
               '\n'
               'Third,sub,\n')
    pool = load_tasks(p)
    assert pool.ids == ("b-00001", "b-00002", "b-00003")
    assert pool[0].prompt == "Multi-line\nprompt, with comma"
    assert [t.topic for t in pool] == ["Cat1", "Cat2", "unknown"]
    # An explicit id column and a topic column (which wins over category).
    p2 = _write(tmp_path / "c.csv", "id,text,topic,category\nq1,hi,T,C\nq2,yo,T2,C2\n")
    assert load_tasks(p2) == TaskPool([Task("q1", "hi", "T", "c"), Task("q2", "yo", "T2", "c")])


def test_alpaca_loader(tmp_path):
    data = [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name three colours.", "input": "", "output": "red, green, blue"},
    ]
    p = _write(tmp_path / "alpaca.json", json.dumps(data, indent=2))
    assert detect_format(p) == "alpaca"
    pool = load_tasks(p)
    assert pool.prompts == ("Translate to French.\n\nGood morning", "Name three colours.")
    assert pool.ids == ("alpaca-00001", "alpaca-00002")
    p2 = _write(tmp_path / "alp.jsonl", "\n".join(json.dumps(d) for d in data))
    assert load_tasks(p2, format="alpaca").prompts == pool.prompts


def test_math_loader(tmp_path):
    probs = [
        {"problem": "What is $1+1$?", "level": "Level 1", "type": "Algebra", "solution": "$2$"},
        {"problem": "Find $x$ if $2x=4$.", "level": "Level 2", "type": "Algebra", "solution": "$2$",
         "unique_id": "test/algebra/2.json"},
    ]
    p = _write(tmp_path / "math.json", json.dumps(probs))
    assert detect_format(p) == "math"
    pool = load_tasks(p)
    assert pool.ids == ("math-00001", "test/algebra/2.json")
    assert all(t.topic == "math" for t in pool)
    assert pool[0].prompt == "What is $1+1$?"
    single = _write(tmp_path / "one.json", json.dumps(probs[0], indent=2))
    assert load_tasks(single).prompts == ("What is $1+1$?",)
    jl = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(d) for d in probs))
    assert load_tasks(jl).prompts == pool.prompts


def test_math_folder(tmp_path):
    root = tmp_path / "MATH" / "test"
    for subject, n, problem in [("algebra", 2, "Solve $x+1=3$."), ("algebra", 10, "What is $2^5$?"),
                                ("geometry", 1, "Find the area of a unit circle.")]:
        (root / subject).mkdir(parents=True, exist_ok=True)
        (root / subject / f"{n}.json").write_text(json.dumps(
            {"problem": problem, "level": "Level 1", "type": subject, "solution": "..."}, indent=4))
    pool = load_tasks(root)
    assert pool.ids == ("algebra/10.json", "algebra/2.json", "geometry/1.json")
    assert pool["geometry/1.json"].prompt == "Find the area of a unit circle."
    assert pool.topics == ("math",) and pool[0].source == "test"
    (root / "geometry" / "2.json").write_text('{"level": "Level 3"}')
    with pytest.raises(TaskFileError, match=r"2\.json:1: missing prompt field 'problem'"):
        load_tasks(root, format="math")
    with pytest.raises(TaskFileError, match="is a folder"):
        load_tasks(root, format="jsonl")


# -- loaders: errors name the file, line and field ----------------------------------------------

def test_error_malformed_jsonl(tmp_path):
    p = _write(tmp_path / "bad.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "text": \n')
    with pytest.raises(TaskFileError, match=r"bad\.jsonl:2: malformed JSON") as e:
        load_tasks(p)
    assert e.value.line == 2 and isinstance(e.value, ValueError)


def test_error_malformed_json_array(tmp_path):
    p = _write(tmp_path / "bad.json", '[\n {"instruction": "a"},\n {"instruction": "b",,}\n]')
    with pytest.raises(TaskFileError, match=r"bad\.json:3: malformed JSON"):
        load_tasks(p, format="alpaca")


def test_error_missing_prompt_field(tmp_path):
    p = _write(tmp_path / "m.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b", "body": "x"}\n')
    with pytest.raises(TaskFileError, match=r"m\.jsonl:2: missing prompt field.*'prompt' or 'text'"):
        load_tasks(p)
    p2 = _write(tmp_path / "noid.jsonl", '{"text": "ok"}\n')
    with pytest.raises(TaskFileError, match=r"noid\.jsonl:1: missing field 'id'"):
        load_tasks(p2, format="jsonl")
    p3 = _write(tmp_path / "x.csv", "body,category\nhello,c\n")
    with pytest.raises(TaskFileError, match=r"x\.csv:1: missing prompt column.*content"):
        load_tasks(p3)
    p4 = _write(tmp_path / "a.json", '[{"instruction": "a"},\n{"output": "b"}]')
    with pytest.raises(TaskFileError, match=r"a\.json:2: missing prompt field 'instruction'"):
        load_tasks(p4, format="alpaca")
    p5 = _write(tmp_path / "mm.jsonl", '{"problem": "a"}\n{"solution": "b"}\n')
    with pytest.raises(TaskFileError, match=r"mm\.jsonl:2: missing prompt field 'problem'"):
        load_tasks(p5, format="math")


def test_error_empty_prompt(tmp_path):
    p = _write(tmp_path / "e.jsonl", '{"id": "a", "text": "ok"}\n{"id": "b7", "prompt": "  "}\n')
    with pytest.raises(TaskFileError, match=r"e\.jsonl:2: empty prompt \(id 'b7'\)"):
        load_tasks(p)
    p2 = _write(tmp_path / "e.csv", 'content,category\nfine,c\n"",c\n')
    with pytest.raises(TaskFileError, match=r"e\.csv:3: empty prompt \(id 'e-00002'\)"):
        load_tasks(p2)
    p3 = _write(tmp_path / "e2.csv", 'content,category\n"two\nlines",c\n" ",c\n')
    with pytest.raises(TaskFileError, match=r"e2\.csv:4: empty prompt"):  # multi-line row counted
        load_tasks(p3)


def test_error_duplicate_id(tmp_path):
    p = _write(tmp_path / "d.jsonl",
               '{"id": "a", "text": "1"}\n{"id": "b", "text": "2"}\n\n{"id": "a", "text": "3"}\n')
    with pytest.raises(TaskFileError, match=r"d\.jsonl:4: duplicate id 'a' \(lines 1 and 4\)"):
        load_tasks(p)
    p2 = _write(tmp_path / "d.csv", "id,content\nx,1\ny,2\nx,3\n")
    with pytest.raises(TaskFileError, match=r"d\.csv:4: duplicate id 'x' \(lines 2 and 4\)"):
        load_tasks(p2)


def test_error_unknown_format_and_misc(tmp_path):
    p = _write(tmp_path / "t.txt", "hello\n")
    with pytest.raises(TaskFileError, match=r"t\.txt: unknown format for extension '\.txt'"):
        load_tasks(p)
    p2 = _write(tmp_path / "t.jsonl", '{"id": "a", "text": "x"}\n')
    with pytest.raises(TaskFileError, match="unknown format 'parquet'"):
        load_tasks(p2, format="parquet")
    with pytest.raises(TaskFileError, match="file not found"):
        load_tasks(tmp_path / "missing.jsonl")
    p3 = _write(tmp_path / "w.json", '{"foo": 1}')
    with pytest.raises(TaskFileError, match=r"w\.json:1: cannot tell the format"):
        load_tasks(p3)
    p4 = _write(tmp_path / "n.jsonl", '["not", "an", "object"]\n')
    with pytest.raises(TaskFileError, match=r"n\.jsonl:1: expected a JSON object, got list"):
        load_tasks(p4, format="jsonl")
    p5 = _write(tmp_path / "r.csv", "content,category\na,b,c\n")
    with pytest.raises(TaskFileError, match=r"r\.csv:2: row has 3 fields but the header has 2"):
        load_tasks(p5)
    p6 = _write(tmp_path / "empty.jsonl", "\n\n")
    with pytest.raises(TaskFileError, match="no tasks found"):
        load_tasks(p6, format="jsonl")
    p7 = _write(tmp_path / "ty.jsonl", '{"id": "a", "text": ["x"]}\n')
    with pytest.raises(TaskFileError, match=r"ty\.jsonl:1: field 'text' \(prompt\) must be a string, got list"):
        load_tasks(p7)


# -- the real public files (optional) -------------------------------------------------------------

def _dataset(name):
    path = os.path.join(DATASETS, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (public datasets are optional)")
    return path


def test_real_wildchat():
    path = _dataset("wildchat_en_8k.jsonl")
    pool = load_tasks(path)
    assert len(pool) == 8044
    assert pool[0].id == "wildchat_8" and pool[0].source == "wildchat_en_8k"
    assert "literature" in pool.topics
    assert pool.subset(200, seed=0).topics  # stratified subset over its own topics works


def test_real_bailbench():
    path = _dataset("bailBench.csv")
    pool = load_tasks(path)
    assert len(pool) == 1630
    assert pool.ids[0] == "bailBench-00001"
    assert pool[0].prompt.startswith("Describe the sound and texture")
    assert "Fraud/Deception" in pool.topics


def test_real_stress_test():
    path = _dataset("stress_test.jsonl")
    pool = load_tasks(path)
    assert len(pool) == 500 and set(t.topic for t in pool) == {"unknown"}
