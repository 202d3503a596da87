"""Preference data, golden answers, query files and the paper's deterministic splits.

Layer 2: plain Python, no Ray. Everything here is deterministic for a given input and seed, so the
same run configuration always sees the same RM pairs, LLM queries and test pairs.

Input formats (auto-detected per JSON line):

* HH-RLHF: ``{"chosen": full dialogue, "rejected": full dialogue}``. Each dialogue is split at its
  LAST ``"\\n\\nAssistant:"``; the prompt keeps that marker, the response is what follows it.
* plain: ``{"prompt": ..., "chosen": response, "rejected": response}``.

A path is a ``.jsonl`` / ``.jsonl.gz`` file, a folder (all such files under it, recursively, sorted
by path), or ``hf://owner/name?data_dir=...&split=...`` (loaded with ``datasets.load_dataset``).
"""

from __future__ import annotations

import gzip
import hashlib
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

from apo_ray.config import ConfigError

logger = logging.getLogger("apo_ray.data")

HH_MARKER = "\n\nAssistant:"
HF_SCHEME = "hf://"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")

# Reasons a pair is dropped by cleaning, in the order they are checked: a prompt mismatch makes the
# response comparison meaningless, and an empty pair is reported as empty rather than "identical".
DROP_REASONS = ("prompt_mismatch", "empty_response", "identical_responses")

# Keyword arguments of datasets.load_dataset that an hf:// path may set in its query string.
_HF_OPTIONS = ("name", "data_dir", "data_files", "split", "revision")

T = TypeVar("T")
PathLike = str | os.PathLike[str]
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


def _iter_file_rows(file: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``("file:line", parsed JSON)`` for each non-blank line of one file."""
    opener = gzip.open if file.name.endswith(".gz") else open
    seen_any = False
    try:
        # utf-8-sig: a byte-order mark at the start of the file (some Windows editors write one)
        # is not part of the first JSON line.
        with opener(file, "rt", encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():  # tolerate blank lines, e.g. a trailing newline
                    continue
                where = f"{file}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: invalid JSON: {exc.msg}") from None
                seen_any = True
                yield where, row
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; truncated gzip -> EOFError
        raise DataError(f"{file}: cannot read file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{file}: not UTF-8 text: {exc}") from exc
    if not seen_any:
        raise DataError(f"{file}: empty file")


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


def _iter_rows(path: PathLike) -> Iterator[tuple[str, Any]]:
    """Rows from a file, a folder of files, or an hf:// dataset, each with its location."""
    if isinstance(path, str) and path.startswith(HF_SCHEME):
        yield from _iter_hf_rows(path)
        return
    for file in _jsonl_files(Path(path)):
        yield from _iter_file_rows(file)


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


def _describe(path: PathLike) -> str:
    return path if isinstance(path, str) else os.fspath(path)


def load_preference_pairs(path: PathLike, clean: bool = True, *, limit: int | None = None) -> PairList:
    """Load preference pairs from a .jsonl(.gz) file, a folder of them, or an hf:// dataset.

    With ``clean`` (the paper's cleaning) pairs with a prompt mismatch (HH), an empty response or
    identical responses are dropped and counted in ``result.dropped``. ``limit`` stops reading once
    that many pairs have been kept (the dropped counts then cover only the rows read).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    pairs = PairList()
    rows_read = 0
    if limit != 0:
        for where, row in _iter_rows(path):
            rows_read += 1
            pair, reason = _parse_pair(row, where)
            if clean and reason is not None:
                pairs.dropped[reason] += 1
                continue
            pairs.append(pair)
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


def load_queries(path: PathLike) -> list[str]:
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
    """The paper's disjoint data blocks (HH_RM, HH_LLM, HH_Dev, HH_Test, RM_Test training data)."""

    rm_pairs: list[PreferencePair]  # D_P; its prompts are also the golden queries
    llm_queries: list[str]  # D_Q: prompts of the LLM block
    dev_pairs: list[PreferencePair]  # RM validation, drawn from the LLM block
    test_pairs: list[PreferencePair]
    eval_rm_pairs: list[PreferencePair]  # training data of the evaluation RM, disjoint from test/rm

    def sizes(self) -> dict[str, int]:
        """Block sizes, for logging."""
        return {
            "rm_pairs": len(self.rm_pairs),
            "llm_queries": len(self.llm_queries),
            "dev_pairs": len(self.dev_pairs),
            "test_pairs": len(self.test_pairs),
            "eval_rm_pairs": len(self.eval_rm_pairs),
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


def split_for_apo(
    pairs: Sequence[PreferencePair],
    *,
    seed: int,
    rm_pairs: Size,
    llm_queries: Size,
    dev_pairs: Size,
    test_pairs: Size,
    eval_rm_pairs: Size = 0,
) -> APOSplits:
    """Shuffle once with ``seed`` and cut disjoint blocks in the order test, rm, llm, eval_rm.

    Sizes count pairs (``llm_queries`` counts the pairs of the LLM block, whose distinct prompts
    become the queries). Pairs sharing a prompt are kept together so a test prompt never leaks into
    training: when a block's quota ends inside such a group, the rest of that group goes unused.
    ``dev_pairs`` are the first pairs of the LLM block, as in the paper (HH_Dev drawn from HH_LLM).
    """
    total = len(pairs)
    n_test = _resolve_size("test_pairs", test_pairs, total)
    n_rm = _resolve_size("rm_pairs", rm_pairs, total)
    n_llm = _resolve_size("llm_queries", llm_queries, total)
    n_dev = _resolve_size("dev_pairs", dev_pairs, total)
    n_eval = _resolve_size("eval_rm_pairs", eval_rm_pairs, total)
    wanted = n_test + n_rm + n_llm + n_eval
    if wanted > total:
        raise ConfigError(
            f"data.test_pairs + data.rm_pairs + data.llm_queries + data.eval_rm_pairs = "
            f"{n_test} + {n_rm} + {n_llm} + {n_eval} = {wanted} exceeds the {total} available pairs"
        )
    if n_dev > n_llm:
        raise ConfigError(
            f"data.dev_pairs = {n_dev} exceeds data.llm_queries = {n_llm} "
            "(dev pairs are drawn from the LLM block)"
        )

    # Group by prompt in first-seen order, then shuffle the groups: deterministic for a given seed.
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(p.prompt, []).append(p)
    order = list(groups.values())
    random.Random(seed).shuffle(order)

    blocks: dict[str, list[PreferencePair]] = {}
    it = iter(order)
    for field, n in (("test_pairs", n_test), ("rm_pairs", n_rm), ("llm_queries", n_llm),
                     ("eval_rm_pairs", n_eval)):
        block: list[PreferencePair] = []
        while len(block) < n:
            group = next(it, None)
            if group is None:
                raise ConfigError(
                    f"data.{field}: only {len(block)} of {n} pairs left after keeping pairs with the "
                    f"same prompt in one block; lower the block sizes (total {wanted} of {total})"
                )
            block.extend(group[: n - len(block)])  # trimmed tail of the group is left unused
        blocks[field] = block

    llm_block = blocks["llm_queries"]
    return APOSplits(
        rm_pairs=blocks["rm_pairs"],
        llm_queries=list(dict.fromkeys(p.prompt for p in llm_block)),
        dev_pairs=llm_block[:n_dev],
        test_pairs=blocks["test_pairs"],
        eval_rm_pairs=blocks["eval_rm_pairs"],
    )


def iter_batches(items: Sequence[T], batch_size: int) -> Iterator[list[T]]:
    """Consecutive batches of at most ``batch_size`` items (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])
