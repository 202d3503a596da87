"""Tests for apo_ray.data: parsing, cleaning, errors, golden answers, queries and splits."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pytest

from apo_ray.config import ConfigError
from apo_ray.data import (
    DEFAULT_DATA,
    DROP_REASONS,
    APOSplits,
    DataError,
    GoldenAnswer,
    PairList,
    PreferencePair,
    golden_by_key,
    golden_from_chosen,
    golden_query_pairs,
    iter_batches,
    load_apo_splits,
    load_golden_answers,
    load_preference_pairs,
    load_queries,
    query_key,
    resolve_sources,
    save_golden_answers,
    split_for_apo,
)

# Exact result of cleaning harmless-base/test.jsonl.gz (2,312 lines), observed when this was written.
HH_TEST_LINES = 2312
HH_TEST_KEPT = 2303
HH_TEST_DROPPED = {"prompt_mismatch": 5, "empty_response": 4, "identical_responses": 0}


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write rows as JSON lines, gzip-compressed when the name ends in .gz."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def hh_row(history: str, chosen: str, rejected: str) -> dict[str, str]:
    return {"chosen": f"{history}\n\nAssistant: {chosen}", "rejected": f"{history}\n\nAssistant: {rejected}"}


HISTORY = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How do I bake bread?"


# ------------------------------------------------------------------------------------------ parsing


def test_hh_format_splits_at_last_assistant_turn(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "hh.jsonl", [hh_row(HISTORY, "  Use flour.\n", "\tNo idea. ")])
    pairs = load_preference_pairs(f)
    assert pairs == [PreferencePair(HISTORY + "\n\nAssistant:", "Use flour.", "No idea.")]
    # the earlier assistant turn stays inside the prompt
    assert pairs[0].prompt.count("\n\nAssistant:") == 2
    assert pairs[0].prompt.endswith("\n\nAssistant:")


def test_plain_format(tmp_path: Path) -> None:
    rows = [{"prompt": "Q1", "chosen": " good ", "rejected": "bad"}, {"prompt": "Q2", "chosen": "a", "rejected": "b"}]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pairs == [PreferencePair("Q1", "good", "bad"), PreferencePair("Q2", "a", "b")]
    assert isinstance(pairs, PairList)
    assert pairs.dropped == {r: 0 for r in DROP_REASONS}


def test_mixed_formats_in_one_file_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "mixed.jsonl"
    f.write_text(
        json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n\n"
        + json.dumps(hh_row(HISTORY, "x", "y")) + "\n",
        encoding="utf-8",
    )
    pairs = load_preference_pairs(f)
    assert [p.chosen for p in pairs] == ["a", "x"]


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """A file saved with a UTF-8 BOM (as some Windows editors do) reads like one without."""
    bom = b"\xef\xbb\xbf"
    rows = [json.dumps({"prompt": "Q\u00e9", "chosen": "a", "rejected": "b"}), json.dumps(hh_row(HISTORY, "c", "d"))]
    f = tmp_path / "bom.jsonl"
    f.write_bytes(bom + "\n".join(rows).encode("utf-8") + b"\n")
    g = tmp_path / "bom.jsonl.gz"
    g.write_bytes(gzip.compress(f.read_bytes()))
    for path in (f, g):
        pairs = load_preference_pairs(path)
        assert [p.chosen for p in pairs] == ["a", "c"] and pairs[0].prompt == "Q\u00e9"
    answers = tmp_path / "gold.jsonl"
    answers.write_bytes(bom + json.dumps({"prompt": "Q", "response": "R"}).encode() + b"\n")
    assert [a.response for a in load_golden_answers(answers)] == ["R"]
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes(bom + json.dumps({"prompt": "Q"}).encode() + b"\n")
    assert load_queries(queries) == ["Q"]


def test_gz_file(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "hh.jsonl.gz", [hh_row(HISTORY, "yes", "no")])
    assert load_preference_pairs(f) == [PreferencePair(HISTORY + "\n\nAssistant:", "yes", "no")]


def test_folder_reads_recursively_sorted(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "b" / "z.jsonl", [{"prompt": "3", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "a.jsonl.gz", [{"prompt": "1", "chosen": "a", "rejected": "b"}])
    write_jsonl(tmp_path / "b" / "a.jsonl", [{"prompt": "2", "chosen": "a", "rejected": "b"}])
    (tmp_path / "notes.txt").write_text("not data")  # ignored: not .jsonl
    pairs = load_preference_pairs(tmp_path)
    assert [p.prompt for p in pairs] == ["1", "2", "3"]


def test_limit_stops_after_kept_pairs(tmp_path: Path) -> None:
    rows = [{"prompt": str(i), "chosen": "a", "rejected": "a" if i == 0 else "b"} for i in range(10)]
    pairs = load_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows), limit=3)
    assert [p.prompt for p in pairs] == ["1", "2", "3"]
    assert pairs.dropped["identical_responses"] == 1
    assert load_preference_pairs(tmp_path / "p.jsonl", limit=0) == []


# ----------------------------------------------------------------------------------------- cleaning


def _dirty_rows() -> list[dict[str, str]]:
    return [
        hh_row(HISTORY, "good", "bad"),  # kept
        hh_row(HISTORY, "same ", " same"),  # identical after strip
        {"chosen": HISTORY + "\n\nAssistant: a", "rejected": "\n\nHuman: other\n\nAssistant: b"},  # mismatch
        hh_row(HISTORY, "   ", "something"),  # empty response
        {"prompt": "Q", "chosen": "x", "rejected": "x"},  # identical, plain format
    ]


def test_cleaning_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = write_jsonl(tmp_path / "dirty.jsonl", _dirty_rows())
    with caplog.at_level(logging.INFO, logger="apo_ray.data"):
        pairs = load_preference_pairs(f)
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")]
    assert pairs.dropped == {"prompt_mismatch": 1, "empty_response": 1, "identical_responses": 2}
    info = [r.getMessage() for r in caplog.records if r.name == "apo_ray.data"]
    assert len(info) == 1 and "loaded 1 preference pairs" in info[0] and "identical_responses=2" in info[0]


def test_no_cleaning_keeps_everything(tmp_path: Path) -> None:
    pairs = load_preference_pairs(write_jsonl(tmp_path / "dirty.jsonl", _dirty_rows()), clean=False)
    assert len(pairs) == 5
    assert sum(pairs.dropped.values()) == 0
    # the mismatched HH row takes its prompt from the chosen dialogue
    assert pairs[2].prompt == HISTORY + "\n\nAssistant:"


# ------------------------------------------------------------------------------------------- errors


def test_malformed_json_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(f))}:2: invalid JSON"):
        load_preference_pairs(f)


def test_missing_field_names_field_and_line(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "x.jsonl", [hh_row(HISTORY, "a", "b")] * 16 + [{"chosen": HISTORY}])
    with pytest.raises(DataError) as info:
        load_preference_pairs(f)
    assert str(info.value) == f"{f}:17: missing field 'rejected'"


def test_wrong_types_and_missing_marker(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q", "chosen": 3, "rejected": "b"}])
    with pytest.raises(DataError, match=r":1: field 'chosen' must be a string"):
        load_preference_pairs(f)
    g = write_jsonl(tmp_path / "m.jsonl", [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}])
    with pytest.raises(DataError, match=r"m.jsonl:1: field 'chosen' has no"):
        load_preference_pairs(g)
    h = write_jsonl(tmp_path / "l.jsonl", [[1, 2]])
    with pytest.raises(DataError, match=r"l.jsonl:1: expected a JSON object"):
        load_preference_pairs(h)


def test_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_preference_pairs(f)
    assert str(info.value) == f"{f}: empty file"


def test_nonexistent_path_and_empty_folder_and_bad_suffix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_preference_pairs(missing)
    assert str(info.value) == f"{missing}: file not found"
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"d: no \.jsonl or \.jsonl\.gz files"):
        load_preference_pairs(tmp_path / "d")
    txt = tmp_path / "data.txt"
    txt.write_text("{}")
    with pytest.raises(DataError, match=r"expected a \.jsonl or \.jsonl\.gz file"):
        load_preference_pairs(txt)


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.jsonl.gz"
    f.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match=r"broken\.jsonl\.gz: cannot read file"):
        load_preference_pairs(f)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------- real data


def test_real_hh_harmless_test_count(hh_data_path: Path) -> None:
    f = hh_data_path / "harmless-base" / "test.jsonl.gz"
    pairs = load_preference_pairs(f)
    assert 2200 <= len(pairs) <= HH_TEST_LINES
    assert len(pairs) == HH_TEST_KEPT
    assert pairs.dropped == HH_TEST_DROPPED
    assert sum(pairs.dropped.values()) == HH_TEST_LINES - len(pairs)
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen and p.rejected for p in pairs)
    assert all(p.chosen != p.rejected for p in pairs)
    # without cleaning every line becomes a pair
    assert len(load_preference_pairs(f, clean=False)) == HH_TEST_LINES


# ------------------------------------------------------------------------------------------- splits


def make_pairs(n: int, dup_every: int = 0) -> list[PreferencePair]:
    """n pairs; with dup_every=k, every k-th pair reuses the previous pair's prompt."""
    pairs = []
    for i in range(n):
        prompt = f"q{i - 1}" if dup_every and i % dup_every == 0 and i > 0 else f"q{i}"
        pairs.append(PreferencePair(prompt, f"good{i}", f"bad{i}"))
    return pairs


def test_split_sizes_and_disjointness() -> None:
    pairs = make_pairs(100)
    s = split_for_apo(pairs, seed=0, rm_pairs=20, llm_queries=50, dev_pairs=10, test_pairs=15, eval_rm_pairs=10)
    assert isinstance(s, APOSplits)
    assert s.sizes() == {"rm_pairs": 20, "llm_queries": 50, "dev_pairs": 10, "test_pairs": 15, "eval_rm_pairs": 10,
                       "train_pairs": 85}
    rm, test, ev = set(s.rm_pairs), set(s.test_pairs), set(s.eval_rm_pairs)
    llm = set(s.llm_queries)
    assert not rm & test and not rm & ev and not test & ev
    for block in (rm, test, ev):
        assert not {p.prompt for p in block} & llm
    # dev pairs come from the LLM block
    assert {p.prompt for p in s.dev_pairs} <= llm
    assert set(s.rm_pairs + s.test_pairs + s.eval_rm_pairs) <= set(pairs)


def test_split_is_deterministic_per_seed() -> None:
    pairs = make_pairs(200)
    kw = {"rm_pairs": 50, "llm_queries": 100, "dev_pairs": 20, "test_pairs": 30, "eval_rm_pairs": 20}
    a = split_for_apo(pairs, seed=7, **kw)
    b = split_for_apo(list(pairs), seed=7, **kw)
    c = split_for_apo(pairs, seed=8, **kw)
    assert a == b
    assert a.test_pairs != c.test_pairs and a.rm_pairs != c.rm_pairs


def test_split_fractions() -> None:
    pairs = make_pairs(1000)
    s = split_for_apo(pairs, seed=1, rm_pairs=0.2, llm_queries=0.6, dev_pairs=0.1, test_pairs=0.1, eval_rm_pairs=0.1)
    assert s.sizes() == {"rm_pairs": 200, "llm_queries": 600, "dev_pairs": 100, "test_pairs": 100, "eval_rm_pairs": 100,
                       "train_pairs": 900}
    full = split_for_apo(pairs, seed=1, rm_pairs=0, llm_queries=0, dev_pairs=0, test_pairs=1.0)
    assert len(full.test_pairs) == 1000 and sorted(full.test_pairs, key=pairs.index) == pairs


def test_split_oversize_errors() -> None:
    """Sizes that do not fit are config errors naming the data.* fields (the main job prints them
    as such, not as a traceback)."""
    pairs = make_pairs(100)
    with pytest.raises(ConfigError, match=r"= 110 exceeds the 100 available pairs") as info:
        split_for_apo(pairs, seed=0, rm_pairs=50, llm_queries=50, dev_pairs=0, test_pairs=10)
    assert "data.rm_pairs" in str(info.value)
    with pytest.raises(ConfigError, match=r"data\.dev_pairs = 30 exceeds data\.llm_queries = 20"):
        split_for_apo(pairs, seed=0, rm_pairs=10, llm_queries=20, dev_pairs=30, test_pairs=10)
    with pytest.raises(ValueError, match=r"data\.test_pairs = 1\.5"):
        split_for_apo(pairs, seed=0, rm_pairs=10, llm_queries=20, dev_pairs=0, test_pairs=1.5)
    with pytest.raises(ConfigError, match=r"data\.dev_pairs must be an int count"):
        split_for_apo(pairs, seed=0, rm_pairs=10, llm_queries=20, dev_pairs="5", test_pairs=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"data\.rm_pairs = -1"):
        split_for_apo(pairs, seed=0, rm_pairs=-1, llm_queries=20, dev_pairs=0, test_pairs=1)


def test_split_keeps_same_prompt_in_one_block() -> None:
    pairs = make_pairs(300, dup_every=3)  # many prompts appear twice
    assert len({p.prompt for p in pairs}) < len(pairs)
    for seed in range(5):
        s = split_for_apo(pairs, seed=seed, rm_pairs=60, llm_queries=120, dev_pairs=20, test_pairs=50,
                          eval_rm_pairs=40)
        assert len(s.test_pairs) == 50 and len(s.rm_pairs) == 60 and len(s.eval_rm_pairs) == 40
        test_prompts = {p.prompt for p in s.test_pairs}
        train_prompts = {p.prompt for p in s.rm_pairs + s.eval_rm_pairs} | set(s.llm_queries)
        assert not test_prompts & train_prompts
        assert not {p.prompt for p in s.rm_pairs} & ({p.prompt for p in s.eval_rm_pairs} | set(s.llm_queries))
        assert len(s.llm_queries) == len(set(s.llm_queries))


def test_split_grouping_can_run_out() -> None:
    # one prompt shared by all pairs: the test block takes part of the group, the rest is unusable
    pairs = [PreferencePair("same", f"g{i}", f"b{i}") for i in range(10)]
    with pytest.raises(ValueError, match=r"data\.rm_pairs: only 0 of 2 pairs left"):
        split_for_apo(pairs, seed=0, rm_pairs=2, llm_queries=0, dev_pairs=0, test_pairs=3)


# ----------------------------------------------------------------------------------- golden/queries


def test_golden_round_trip_and_join(tmp_path: Path) -> None:
    answers = [
        GoldenAnswer("\n\nHuman: hi\n\nAssistant:", "Hello! How can I help?", "gpt-4"),
        GoldenAnswer("Q2 ünïcode", "I can't help with that, because ...", "canned-refusal"),
    ]
    for name in ("gold.jsonl", "sub/gold.jsonl.gz"):
        path = save_golden_answers(tmp_path / name, answers)
        assert load_golden_answers(path) == answers
    # join golden answers to queries by key
    queries = [answers[1].prompt, answers[0].prompt, "unanswered"]
    index = golden_by_key(answers)
    joined = [index.get(query_key(q)) for q in queries]
    assert joined == [answers[1], answers[0], None]


def test_golden_source_defaults_to_file(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "p", "response": "r"}])
    assert load_golden_answers(f) == [GoldenAnswer("p", "r", "file")]
    bad = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"b\.jsonl:1: missing field 'response'"):
        load_golden_answers(bad)


def test_query_key() -> None:
    k = query_key("hello")
    assert k == "aaf4c61ddcc5e8a2"  # sha1("hello")[:16]
    assert len(k) == 16 and query_key("hello ") != k


def test_golden_from_chosen() -> None:
    pairs = [PreferencePair("a", "A1", "x"), PreferencePair("b", "B", "y"), PreferencePair("a", "A2", "z")]
    gold = golden_from_chosen(pairs)
    assert gold == [GoldenAnswer("a", "A1", "chosen-fallback"), GoldenAnswer("b", "B", "chosen-fallback")]


def test_load_queries_from_queries_and_preference_files(tmp_path: Path) -> None:
    q = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "one"}, {"prompt": "two"}, {"prompt": "one"}])
    assert load_queries(q) == ["one", "two"]
    p = write_jsonl(tmp_path / "p.jsonl.gz", [hh_row(HISTORY, "a", "b"), {"prompt": "Q", "chosen": "c", "rejected": "d"}])
    assert load_queries(p) == [HISTORY + "\n\nAssistant:", "Q"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'prompt'"):
        load_queries(bad)


def test_iter_batches() -> None:
    assert list(iter_batches(list(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(iter_batches([], 4)) == []
    with pytest.raises(ValueError):
        list(iter_batches([1], 0))


def test_hf_path_uses_load_dataset_and_shared_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name: str, **kwargs: str) -> list[dict[str, str]]:
        calls.append((name, kwargs))
        return [hh_row(HISTORY, "fine", "fine"), hh_row(HISTORY, "good", "bad"), {"chosen": HISTORY}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = "hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=test"
    pairs = load_preference_pairs(spec, limit=1)
    assert calls == [("Anthropic/hh-rlhf", {"data_dir": "harmless-base", "split": "test"})]
    assert pairs == [PreferencePair(HISTORY + "\n\nAssistant:", "good", "bad")]
    assert pairs.dropped["identical_responses"] == 1
    with pytest.raises(DataError, match=rf"^{re.escape(spec)}:3: missing field 'rejected'"):
        load_preference_pairs(spec)
    with pytest.raises(DataError, match=r"unknown option\(s\) \['spilt'\]"):
        load_preference_pairs("hf://Anthropic/hh-rlhf?spilt=test")


# ------------------------------------------------------------------------------- embedded data, sources


def test_embedded_default_is_the_packaged_hh_file(hh_data_path: Path) -> None:
    pairs = load_preference_pairs(DEFAULT_DATA)
    assert len(pairs) == HH_TEST_KEPT and pairs.dropped == HH_TEST_DROPPED
    # locations in errors and logs name the data set, not a site-packages path
    with pytest.raises(DataError, match=r"unknown embedded data set 'nope'.*embedded:hh-rlhf-harmless-test"):
        load_preference_pairs("embedded:nope")
    from apo_ray.config import compose

    assert compose([]).data.path in (DEFAULT_DATA, str(hh_data_path))  # the default (or $APO_HH_DATA)


def test_embedded_data_is_package_data() -> None:
    """The wheel carries the file: setuptools' package-data globs match it (a non-editable install
    or a wheel would otherwise run without its default data)."""
    from fnmatch import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    root = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["apo_ray"]
    shipped = [p.relative_to(root / "apo_ray").as_posix() for p in (root / "apo_ray" / "resources").rglob("*")
               if p.is_file()]
    assert sorted(shipped) == sorted(["resources/hh-rlhf/LICENSE", "resources/hh-rlhf/README.md",
                                      "resources/hh-rlhf/harmless-base/test.jsonl.gz"])
    assert all(any(fnmatch(f, g) for g in globs) for f in shipped)


def test_several_sources_are_read_in_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [hh_row(HISTORY, "a1", "a2"), hh_row(HISTORY, "same", "same")])
    write_jsonl(tmp_path / "b" / "b.jsonl.gz", [{"prompt": "Q", "chosen": "b1", "rejected": "b2"}])
    pairs = load_preference_pairs([str(a), tmp_path / "b"])
    assert [p.chosen for p in pairs] == ["a1", "b1"] and pairs.dropped["identical_responses"] == 1
    with pytest.raises(DataError, match="no data source given"):
        load_preference_pairs([])
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'b' / 'b.jsonl.gz'))}:2: invalid JSON"):
        with gzip.open(tmp_path / "b" / "b.jsonl.gz", "at") as fh:
            fh.write("{oops\n")
        load_preference_pairs([a, tmp_path / "b"])


def test_each_pair_names_its_source_without_changing_its_identity(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "harm" / "test.jsonl", [{"prompt": "Q", "chosen": "x", "rejected": "y"}])
    write_jsonl(tmp_path / "help" / "test.jsonl.gz", [{"prompt": "Q", "chosen": "x", "rejected": "y"},
                                                      {"prompt": "R", "chosen": "u", "rejected": "v"}])
    pairs = load_preference_pairs([a, tmp_path / "help"])
    folder = f"{tmp_path.name}/help"  # a source's parent folder and name
    assert [p.source for p in pairs] == ["harm/test.jsonl", folder, folder]
    assert pairs[0] == pairs[1] and len({pairs[0], pairs[1]}) == 1  # the same texts: the same pair
    assert [p.source for p in load_preference_pairs([a, tmp_path / "help"], limit=2)] == ["harm/test.jsonl", folder]
    assert {p.source for p in load_preference_pairs(DEFAULT_DATA, limit=3)} == {DEFAULT_DATA}


def test_resolve_sources_reads_relative_paths_from_the_start_dir(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "x.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    assert resolve_sources("d/x.jsonl", "data.path", tmp_path) == str(tmp_path / "d" / "x.jsonl")
    assert resolve_sources(["d", DEFAULT_DATA, "hf://Anthropic/hh-rlhf?split=test"], "data.path", tmp_path) == [
        str(tmp_path / "d"), DEFAULT_DATA, "hf://Anthropic/hh-rlhf?split=test"]
    with pytest.raises(DataError) as err:
        resolve_sources(["d", "missing.jsonl"], "data.test_path", tmp_path)
    assert str(err.value) == (f"data.test_path: 'missing.jsonl' not found: tried {tmp_path / 'missing.jsonl'} "
                              f"(a relative path is read from the directory the command was started in, {tmp_path})")
    with pytest.raises(DataError, match=r"^data.path: '/no/such' not found: tried /no/such$"):
        resolve_sources("/no/such", "data.path", tmp_path)
    with pytest.raises(DataError, match="unknown embedded data set"):
        resolve_sources("embedded:hh-rlhf", "data.path", tmp_path)


def test_test_block_from_its_own_source_is_never_cut_from_train() -> None:
    train, test = make_pairs(100), [PreferencePair(f"t{i}", "g", "b") for i in range(30)]
    s = split_for_apo(train, seed=3, rm_pairs=0.25, llm_queries=0.7, dev_pairs=10, test_pairs=1.0,
                      test_source=test)
    assert sorted(p.prompt for p in s.test_pairs) == sorted(p.prompt for p in test) and s.test_from == "test_path"
    assert len(s.rm_pairs) == 25 and len(s.llm_queries) == 70 and len(s.dev_pairs) == 10
    assert {p.prompt for p in s.dev_pairs} <= set(s.llm_queries)  # dev: pairs of the LLM block
    assert s.train_pairs == train  # RM_Test: every training pair
    part = split_for_apo(train, seed=3, rm_pairs=25, llm_queries=70, dev_pairs=0, test_pairs=12, test_source=test)
    assert len(part.test_pairs) == 12 and {p.prompt for p in part.test_pairs} <= {p.prompt for p in test}
    with pytest.raises(ValueError, match="exceeds the 30 pairs of data.test_path"):
        split_for_apo(train, seed=3, rm_pairs=25, llm_queries=70, dev_pairs=0, test_pairs=31, test_source=test)
    # cut from the data: RM_Test gets everything but the test block
    cut = split_for_apo(train, seed=3, rm_pairs=20, llm_queries=60, dev_pairs=0, test_pairs=15)
    assert len(cut.train_pairs) == 85 and not {p.prompt for p in cut.train_pairs} & {p.prompt for p in cut.test_pairs}


def test_load_apo_splits_merges_sources_and_reads_the_test_path(tmp_path: Path) -> None:
    from apo_ray.config import DataConfig

    helpful = write_jsonl(tmp_path / "helpful" / "train.jsonl", [hh_row(f"\n\nHuman: h{i}", "g", "b") for i in range(40)])
    harmless = write_jsonl(tmp_path / "harmless" / "train.jsonl.gz",
                           [hh_row(f"\n\nHuman: x{i}", "g", "b") for i in range(60)])
    tests = [write_jsonl(tmp_path / name / "test.jsonl", [hh_row(f"\n\nHuman: {name}-t{i}", "g", "b") for i in range(5)])
             for name in ("helpful", "harmless")]
    d = DataConfig(path=[str(helpful), str(harmless)], test_path=[str(t) for t in tests], rm_pairs=0.2,
                   llm_queries=0.79, dev_pairs=10, test_pairs=1.0)
    s = load_apo_splits(d)
    assert len(s.test_pairs) == 10 and all("-t" in p.prompt for p in s.test_pairs)
    assert len(s.train_pairs) == 100 and not any("-t" in p.prompt for p in s.train_pairs + s.rm_pairs)
    assert len(s.rm_pairs) == 20 and len(s.llm_queries) == 79 and len(s.dev_pairs) == 10
    assert {p.prompt[9] for p in s.rm_pairs} == {"h", "x"}  # both subsets in D_P
    assert golden_query_pairs(s, 3) == s.rm_pairs[:3]
    assert load_apo_splits(d) == s  # deterministic


def test_golden_queries_are_the_first_pair_of_each_distinct_dp_prompt() -> None:
    s = split_for_apo(make_pairs(60, dup_every=3), seed=1, rm_pairs=20, llm_queries=20, dev_pairs=0, test_pairs=10)
    queries = golden_query_pairs(s)
    assert [q.prompt for q in queries] == list(dict.fromkeys(p.prompt for p in s.rm_pairs))
    assert all(q == next(p for p in s.rm_pairs if p.prompt == q.prompt) for q in queries)
    assert golden_query_pairs(s, 4) == queries[:4]
