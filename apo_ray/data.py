"""Preference data, golden answers, query files and the paper's deterministic splits.

Plain Python, no Ray. Everything here is deterministic for a given input and seed, so the
same run configuration always sees the same RM pairs, LLM queries and test pairs.

Input formats (auto-detected per JSON line):

* HH-RLHF: ``{"chosen": full dialogue, "rejected": full dialogue}``. Each dialogue is split at its
  LAST ``"\\n\\nAssistant:"``; the prompt keeps that marker, the response is what follows it.
* plain: ``{"prompt": ..., "chosen": response, "rejected": response}``.

A source is a ``.jsonl`` / ``.jsonl.gz`` file, a folder (all such files under it, recursively, sorted
by path), ``hf://owner/name?data_dir=...&split=...`` (loaded with ``datasets.load_dataset``), or
``embedded:<name>``: a data set shipped inside this package (:data:`EMBEDDED_DATASETS`, read through
``importlib.resources``, so it is there in an editable install, a wheel and a Ray job's working dir).
Wherever a path is taken, a list of sources is accepted too: their rows are read one source after
the other, in the order given.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import json
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from apo_ray.config import Config, ConfigError

logger = logging.getLogger("apo_ray.data")

HH_MARKER = "\n\nAssistant:"
HF_SCHEME = "hf://"
EMBEDDED_SCHEME = "embedded:"
# embedded:<name> -> file under apo_ray/resources/ (package data; LICENSE and README beside each).
EMBEDDED_DATASETS = {
    # HH-RLHF harmless-base test split (Anthropic, MIT): 2,312 lines, 2,303 pairs after cleaning.
    "hh-rlhf-harmless-test": "hh-rlhf/harmless-base/test.jsonl.gz",
}
DEFAULT_DATA = EMBEDDED_SCHEME + "hh-rlhf-harmless-test"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")

# Reasons a pair is dropped by cleaning, in the order they are checked: a prompt mismatch makes the
# response comparison meaningless, and an empty pair is reported as empty rather than "identical".
DROP_REASONS = ("prompt_mismatch", "empty_response", "identical_responses")

# Keyword arguments of datasets.load_dataset that an hf:// path may set in its query string.
_HF_OPTIONS = ("name", "data_dir", "data_files", "split", "revision")

T = TypeVar("T")
PathLike = str | os.PathLike[str]
# One source or several, read in order and merged (see the module docstring).
Sources = PathLike | Sequence[PathLike]
# A block size: an int is a count of pairs, a float a fraction in (0, 1] of all pairs.
Size = int | float


class DataError(ValueError):
    """Bad input data; the message names the file (and 1-based line) at fault."""


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: the prompt (with dialogue history) and the better and worse final responses."""

    prompt: str
    chosen: str
    rejected: str
    # Which source it was read from (source_label: "embedded:<name>", "hf://...", or a file's
    # folder/name), so results can be broken down by data subset; not part of the pair's identity.
    source: str = dataclasses.field(default="", compare=False)


@dataclass(frozen=True)
class RankedPair:
    """One comparison the RM trains on: ``good`` should score above ``bad``. ``kind``: "apo" (gold
    vs policy sample, D_APO) or "pref" (human chosen vs rejected, D_P)."""

    prompt: str
    good: str
    bad: str
    kind: str = "pref"

    @classmethod
    def from_preference(cls, pair: PreferencePair) -> RankedPair:
        return cls(pair.prompt, pair.chosen, pair.rejected, "pref")


class PairList(list[PreferencePair]):
    """A list of pairs that also reports how many rows cleaning dropped, by reason."""

    def __init__(self, pairs: Iterable[PreferencePair] = (), dropped: dict[str, int] | None = None):
        super().__init__(pairs)
        self.dropped: dict[str, int] = dict(dropped) if dropped else {r: 0 for r in DROP_REASONS}


@dataclass(frozen=True)
class GoldenAnswer:
    """A high-quality reference answer to a prompt; ``source`` says where it came from."""

    prompt: str
    response: str
    source: str


# --------------------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------------------


def _jsonl_files(path: Path) -> list[Path]:
    """The .jsonl/.jsonl.gz files that ``path`` names, sorted so results are reproducible."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
        if not files:
            raise DataError(f"{path}: no .jsonl or .jsonl.gz files in folder")
        return files
    if not path.name.endswith(JSONL_SUFFIXES):
        raise DataError(f"{path}: expected a .jsonl or .jsonl.gz file")
    return [path]


def _iter_file_rows(file: Path, label: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", parsed JSON)`` for each non-blank line of one file (``label`` names
    the file in those locations and in errors; default: its path)."""
    opener = gzip.open if file.name.endswith(".gz") else open
    name = label or str(file)
    seen_any = False
    try:
        # utf-8-sig: a byte-order mark at the start of the file (some Windows editors write one)
        # is not part of the first JSON line.
        with opener(file, "rt", encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():  # tolerate blank lines, e.g. a trailing newline
                    continue
                where = f"{name}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
                seen_any = True
                yield where, row
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; truncated gzip -> EOFError
        raise DataError(f"{name}: cannot read file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8 text: {exc}") from exc
    if not seen_any:
        raise DataError(f"{name}: empty file")


def _iter_hf_rows(spec: str) -> Iterator[tuple[str, Any]]:
    """Yield rows of a Hugging Face dataset named by ``hf://owner/name?data_dir=..&split=..``."""
    parts = urlsplit(spec)
    name = (parts.netloc + parts.path).strip("/")
    if not name:
        raise DataError(f"{spec}: no dataset name after {HF_SCHEME}")
    options = dict(parse_qsl(parts.query))
    unknown = sorted(set(options) - set(_HF_OPTIONS))
    if unknown:
        raise DataError(f"{spec}: unknown option(s) {unknown}; allowed: {list(_HF_OPTIONS)}")
    # Without a split load_dataset returns a DatasetDict of all splits; one list of rows is wanted.
    options.setdefault("split", "train")
    import datasets  # imported lazily: heavy, and only needed for hf:// paths

    ds = datasets.load_dataset(name, **options)
    for index, row in enumerate(ds, start=1):
        yield f"{spec}:{index}", row


def embedded_resource(spec: str):
    """The packaged file that ``embedded:<name>`` names (an importlib.resources Traversable)."""
    name = spec[len(EMBEDDED_SCHEME):]
    if name not in EMBEDDED_DATASETS:
        raise DataError(f"{spec}: unknown embedded data set {name!r}; available: "
                        f"{[EMBEDDED_SCHEME + n for n in EMBEDDED_DATASETS]}")
    resource = importlib.resources.files("apo_ray").joinpath("resources", *EMBEDDED_DATASETS[name].split("/"))
    if not resource.is_file():
        raise DataError(f"{spec}: the packaged file apo_ray/resources/{EMBEDDED_DATASETS[name]} is missing "
                        "from this installation of apo_ray")
    return resource


def _iter_embedded_rows(spec: str) -> Iterator[tuple[str, Any]]:
    # as_file: a real path even when the package is imported from a zip
    with importlib.resources.as_file(embedded_resource(spec)) as file:
        yield from _iter_file_rows(Path(file), label=spec)


def as_sources(path: Sources) -> list[PathLike]:
    """One source or a list of sources -> a non-empty list of sources."""
    if isinstance(path, (str, os.PathLike)):
        return [path]
    sources = list(path)
    if not sources:
        raise DataError("no data source given (an empty list)")
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            raise DataError(f"a data source must be a path or hf:// / embedded: name, got {source!r}")
    return sources


def _iter_rows(path: Sources) -> Iterator[tuple[str, Any]]:
    """Rows from each source in turn (file, folder, hf:// or embedded: data set), with locations."""
    for source in as_sources(path):
        if isinstance(source, str) and source.startswith(HF_SCHEME):
            yield from _iter_hf_rows(source)
        elif isinstance(source, str) and source.startswith(EMBEDDED_SCHEME):
            yield from _iter_embedded_rows(source)
        else:
            for file in _jsonl_files(Path(source)):
                yield from _iter_file_rows(file)


def resolve_sources(value: Sources, field: str, base_dir: PathLike) -> str | list[str]:
    """``value`` with every local path made absolute against ``base_dir`` (the directory the command
    was started in) and checked to exist; hf:// and embedded: names pass through unchanged.

    Raises DataError naming the config ``field``, the path as given and the path tried."""
    resolved = []
    for source in as_sources(value):
        source = os.fspath(source)
        if source.startswith(EMBEDDED_SCHEME):
            embedded_resource(source)  # an unknown name fails here, before any work
        elif not source.startswith(HF_SCHEME):
            tried = Path(base_dir, os.path.expanduser(source)).resolve()
            if not tried.exists():
                where = "" if os.path.isabs(os.path.expanduser(source)) else \
                    f" (a relative path is read from the directory the command was started in, {base_dir})"
                raise DataError(f"{field}: {source!r} not found: tried {tried}{where}")
            source = str(tried)
        resolved.append(source)
    return resolved[0] if isinstance(value, (str, os.PathLike)) else resolved


# --------------------------------------------------------------------------------------------------
# Parsing one row (shared by local files and hf:// datasets)
# --------------------------------------------------------------------------------------------------


def _field(row: Any, key: str, where: str) -> str:
    """The string field ``key`` of a JSON object row, or a DataError naming the field and line."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _split_dialogue(dialogue: str, key: str, where: str) -> tuple[str, str]:
    """Split an HH dialogue into (prompt ending with the marker, stripped final response)."""
    cut = dialogue.rfind(HH_MARKER)
    if cut < 0:
        raise DataError(f"{where}: field '{key}' has no {HH_MARKER!r} turn")
    end = cut + len(HH_MARKER)
    return dialogue[:end], dialogue[end:].strip()


def _parse_pair(row: Any, where: str) -> tuple[PreferencePair, str | None]:
    """Parse one row into a pair plus the cleaning reason to drop it (None when it is clean)."""
    chosen_text = _field(row, "chosen", where)
    rejected_text = _field(row, "rejected", where)
    if "prompt" in row:  # plain format
        prompt = _field(row, "prompt", where)
        pair = PreferencePair(prompt, chosen_text.strip(), rejected_text.strip())
        mismatch = False
    else:  # HH-RLHF format: two full dialogues that should share everything but the last answer
        prompt, chosen = _split_dialogue(chosen_text, "chosen", where)
        rejected_prompt, rejected = _split_dialogue(rejected_text, "rejected", where)
        pair = PreferencePair(prompt, chosen, rejected)
        mismatch = prompt != rejected_prompt
    if mismatch:
        return pair, "prompt_mismatch"
    if not pair.chosen or not pair.rejected:
        return pair, "empty_response"
    if pair.chosen == pair.rejected:
        return pair, "identical_responses"
    return pair, None


def source_label(source: PathLike) -> str:
    """A short name for one source in reports: ``embedded:`` and ``hf://`` names as given, a file or
    folder as its parent folder and name (``helpful-base/test.jsonl.gz``)."""
    source = os.fspath(source)
    if source.startswith((EMBEDDED_SCHEME, HF_SCHEME)):
        return source
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _describe(path: Sources) -> str:
    return " + ".join(os.fspath(s) for s in as_sources(path))


def load_preference_pairs(path: Sources, clean: bool = True, *, limit: int | None = None) -> PairList:
    """Load preference pairs from a .jsonl(.gz) file, a folder of them, an hf:// or embedded: data
    set, or a list of such sources (merged in order).

    With ``clean`` (the paper's cleaning) pairs with a prompt mismatch (HH), an empty response or
    identical responses are dropped and counted in ``result.dropped``. ``limit`` stops reading once
    that many pairs have been kept (the dropped counts then cover only the rows read).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    pairs = PairList()
    rows_read = 0
    for source in as_sources(path) if limit != 0 else ():
        label = source_label(source)
        for where, row in _iter_rows(source):
            rows_read += 1
            pair, reason = _parse_pair(row, where)
            if clean and reason is not None:
                pairs.dropped[reason] += 1
                continue
            pairs.append(dataclasses.replace(pair, source=label))
            if limit is not None and len(pairs) >= limit:
                break
        if limit is not None and len(pairs) >= limit:
            break
    dropped = ", ".join(f"{r}={n}" for r, n in pairs.dropped.items())
    logger.info(
        "loaded %d preference pairs from %s (%d rows read; clean=%s; dropped: %s)",
        len(pairs), _describe(path), rows_read, clean, dropped,
    )
    return pairs


# --------------------------------------------------------------------------------------------------
# Queries and golden answers
# --------------------------------------------------------------------------------------------------


def load_queries(path: Sources) -> list[str]:
    """Prompts from a queries file (field "prompt") or from a preference file (its pairs' prompts).

    Duplicates are removed, keeping first-seen order, because sampling the same query twice per
    round only wastes generation. Preference rows are not cleaned: their prompt is usable either way.
    """
    queries: dict[str, None] = {}  # insertion-ordered set
    for where, row in _iter_rows(path):
        if isinstance(row, dict) and ("chosen" in row or "rejected" in row):
            prompt = _parse_pair(row, where)[0].prompt
        else:
            prompt = _field(row, "prompt", where)
        if not prompt.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        queries.setdefault(prompt, None)
    return list(queries)


def query_key(prompt: str) -> str:
    """A short stable key for a prompt (first 16 hex chars of its SHA-1), to join answers to queries."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16]


def load_golden_answers(path: PathLike) -> list[GoldenAnswer]:
    """Read golden answers: JSON lines with "prompt", "response" and optional "source" ("file")."""
    answers = []
    for where, row in _iter_rows(path):
        prompt = _field(row, "prompt", where)
        response = _field(row, "response", where)
        source = _field(row, "source", where) if "source" in row else "file"
        answers.append(GoldenAnswer(prompt, response, source))
    return answers


def save_golden_answers(path: PathLike, answers: Iterable[GoldenAnswer]) -> Path:
    """Write golden answers as JSON lines (gzip if the name ends in .gz); returns the path.

    Written to a temporary file and renamed, so a crash never leaves a half-written answer file
    that a later run would silently load.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as fh:
        for a in answers:
            record = {"key": query_key(a.prompt), "prompt": a.prompt, "response": a.response,
                      "source": a.source}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def golden_from_chosen(pairs: Iterable[PreferencePair]) -> list[GoldenAnswer]:
    """The paper's fallback gold: each prompt's chosen response (first pair wins for a repeated prompt)."""
    answers: dict[str, GoldenAnswer] = {}
    for p in pairs:
        answers.setdefault(p.prompt, GoldenAnswer(p.prompt, p.chosen, "chosen-fallback"))
    return list(answers.values())


def golden_by_key(answers: Iterable[GoldenAnswer]) -> dict[str, GoldenAnswer]:
    """Index golden answers by ``query_key(prompt)``; a later answer for the same prompt wins."""
    return {query_key(a.prompt): a for a in answers}


# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


@dataclass
class APOSplits:
    """The paper's data blocks: HH_RM (D_P), HH_LLM (D_Q), HH_Dev, HH_Test, and the training data
    of the evaluation RMs."""

    rm_pairs: list[PreferencePair]  # D_P; its prompts are also the golden queries
    llm_queries: list[str]  # D_Q: prompts of the LLM block
    dev_pairs: list[PreferencePair]  # RM validation, drawn from the LLM block
    test_pairs: list[PreferencePair]
    eval_rm_pairs: list[PreferencePair]  # a held-out evaluation RM's data, disjoint from every other block
    # Every training pair (all loaded pairs outside the test block): the paper's RM_Test data.
    train_pairs: list[PreferencePair] = dataclasses.field(default_factory=list)
    test_from: str = "train"  # "train": cut from the loaded pairs; else the separate test source

    def sizes(self) -> dict[str, int]:
        """Block sizes, for logging."""
        return {
            "rm_pairs": len(self.rm_pairs),
            "llm_queries": len(self.llm_queries),
            "dev_pairs": len(self.dev_pairs),
            "test_pairs": len(self.test_pairs),
            "eval_rm_pairs": len(self.eval_rm_pairs),
            "train_pairs": len(self.train_pairs),
        }


def _resolve_size(field: str, size: Size, total: int) -> int:
    """A block size given as a count or as a fraction in (0, 1] of ``total`` pairs."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise ConfigError(f"data.{field} must be an int count or a float fraction, got {size!r}")
    if isinstance(size, float) and size == 0.0:
        return 0
    if isinstance(size, float):
        if not 0.0 < size <= 1.0:
            raise ConfigError(f"data.{field} = {size} is a fraction and must be in (0, 1]")
        # floor (with a little slack for float error) so fractions summing to 1 always fit
        return math.floor(size * total + 1e-9)
    if size < 0:
        raise ConfigError(f"data.{field} = {size} must be >= 0")
    return size


def _shuffled_groups(pairs: Sequence[PreferencePair], seed: int) -> list[list[PreferencePair]]:
    """Pairs grouped by prompt (first-seen order), the groups shuffled with ``seed``."""
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.prompt, []).append(p)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    return order


def _fill(it: Iterator[list[PreferencePair]], field: str, n: int, wanted: int, total: int) -> list[PreferencePair]:
    """The next ``n`` pairs of the shuffled groups; the trimmed tail of the last group goes unused."""
    block: list[PreferencePair] = []
    while len(block) < n:
        group = next(it, None)
        if group is None:
            raise ConfigError(
                f"data.{field}: only {len(block)} of {n} pairs left after keeping pairs with the "
                f"same prompt in one block; lower the block sizes (total {wanted} of {total})"
            )
        block.extend(group[: n - len(block)])
    return block


def split_for_apo(
    pairs: Sequence[PreferencePair],
    *,
    seed: int,
    rm_pairs: Size,
    llm_queries: Size,
    dev_pairs: Size,
    test_pairs: Size,
    eval_rm_pairs: Size = 0,
    test_source: Sequence[PreferencePair] | None = None,
) -> APOSplits:
    """Shuffle once with ``seed`` and cut disjoint blocks in the order test, rm, llm, eval_rm.

    Sizes count pairs (``llm_queries`` counts the pairs of the LLM block, whose distinct prompts
    become the queries); a float is a fraction of ``pairs``. Pairs sharing a prompt are kept together
    so a test prompt never leaks into training: when a block's quota ends inside such a group, the
    rest of that group goes unused. ``dev_pairs`` are the first pairs of the LLM block, as in the
    paper (HH_Dev drawn from HH_LLM).

    ``test_source`` (the paper's official test split): the test block is drawn from it instead
    (``test_pairs`` then counts, or is a fraction of, its pairs; seeded shuffle) and nothing is cut
    from ``pairs`` for it.
    """
    total = len(pairs)
    if test_source is None:
        n_test = _resolve_size("test_pairs", test_pairs, total)
    else:
        n_test = _resolve_size("test_pairs", test_pairs, len(test_source))
        if n_test > len(test_source):
            raise ValueError(f"data.test_pairs = {n_test} exceeds the {len(test_source)} pairs of data.test_path")
    n_rm = _resolve_size("rm_pairs", rm_pairs, total)
    n_llm = _resolve_size("llm_queries", llm_queries, total)
    n_dev = _resolve_size("dev_pairs", dev_pairs, total)
    n_eval = _resolve_size("eval_rm_pairs", eval_rm_pairs, total)
    n_cut_test = n_test if test_source is None else 0
    wanted = n_cut_test + n_rm + n_llm + n_eval
    if wanted > total:
        names = "data.test_pairs + " if test_source is None else ""
        counts = f"{n_cut_test} + " if test_source is None else ""
        raise ConfigError(
            f"{names}data.rm_pairs + data.llm_queries + data.eval_rm_pairs = "
            f"{counts}{n_rm} + {n_llm} + {n_eval} = {wanted} exceeds the {total} available pairs"
        )
    if n_dev > n_llm:
        raise ConfigError(
            f"data.dev_pairs = {n_dev} exceeds data.llm_queries = {n_llm} "
            "(dev pairs are drawn from the LLM block)"
        )

    it = iter(_shuffled_groups(pairs, seed))
    if test_source is None:
        test_block = _fill(it, "test_pairs", n_test, wanted, total)
    else:
        test_block = _fill(iter(_shuffled_groups(test_source, seed)), "test_pairs", n_test, n_test,
                           len(test_source))
    blocks = {field: _fill(it, field, n, wanted, total)
              for field, n in (("rm_pairs", n_rm), ("llm_queries", n_llm), ("eval_rm_pairs", n_eval))}
    test_prompts = {p.prompt for p in test_block} if test_source is None else set()
    llm_block = blocks["llm_queries"]
    return APOSplits(
        rm_pairs=blocks["rm_pairs"],
        llm_queries=list(dict.fromkeys(p.prompt for p in llm_block)),
        dev_pairs=llm_block[:n_dev],
        test_pairs=test_block,
        eval_rm_pairs=blocks["eval_rm_pairs"],
        train_pairs=[p for p in pairs if p.prompt not in test_prompts],
        test_from="train" if test_source is None else "test_path",
    )


def load_apo_splits(data) -> APOSplits:
    """Load, clean and split the pairs that a ``DataConfig`` names: ``data.path`` (one source or
    several, merged), the test block from ``data.test_path`` when it is set. The one place both
    the game and the golden-answer job get their blocks from, so they agree on the golden queries."""
    pairs = load_preference_pairs(data.path, clean=data.clean)
    test_source = load_preference_pairs(data.test_path, clean=data.clean) if data.test_path else None
    splits = split_for_apo(pairs, seed=data.seed, rm_pairs=data.rm_pairs, llm_queries=data.llm_queries,
                           dev_pairs=data.dev_pairs, test_pairs=data.test_pairs,
                           eval_rm_pairs=data.eval_rm_pairs, test_source=test_source)
    if test_source is not None:
        train_prompts = {p.prompt for p in pairs}
        shared = len({p.prompt for p in splits.test_pairs} & train_prompts)
        logger.info("test block: %d pairs from data.test_path; %d of its prompts also occur in the training data",
                    len(splits.test_pairs), shared)
    return splits


def golden_query_pairs(splits: APOSplits, gold_queries: int | None = None) -> list[PreferencePair]:
    """The golden queries of a run: the distinct prompts of D_P in split order, the first pair of
    each (its chosen response is the fallback gold), the first ``gold_queries`` of them."""
    first: dict[str, PreferencePair] = {}
    for p in splits.rm_pairs:
        first.setdefault(p.prompt, p)
    return list(first.values())[:gold_queries]


def iter_batches(items: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive batches of at most ``batch_size`` items (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def resolve_paths(cfg: Config, base_dir: str) -> Config:
    """Make the config's local data paths absolute against ``base_dir`` (the directory the command
    was started in) and check that they exist; hf:// and embedded: names pass unchanged. Raises
    :class:`DataError` naming the field, the path as given and the path tried."""
    d = cfg.data
    d.path = resolve_sources(d.path, "data.path", base_dir)
    if d.test_path:
        d.test_path = resolve_sources(d.test_path, "data.test_path", base_dir)
    if d.golden_path:
        d.golden_path = resolve_sources(d.golden_path, "data.golden_path", base_dir)
    if cfg.eval.rm_all_paths:
        cfg.eval.rm_all_paths = resolve_sources(list(cfg.eval.rm_all_paths), "eval.rm_all_paths", base_dir)
    return cfg
