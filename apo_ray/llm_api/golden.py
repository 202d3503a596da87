"""Golden answers for the RM queries, collected from an OpenAI-compatible endpoint (paper, Sec. 5.1).

Per query (an HH prompt with its chosen response), in the paper's order of fall-backs:

1. ask the model with :data:`GOLDEN_SYSTEM_PROMPT` + the dialogue -> source ``"model"``;
2. the provider refuses on content policy (``openai.BadRequestError`` whose code/message names the
   content policy or filter, or ``finish_reason == "content_filter"``) -> one of three polite
   :data:`CANNED_REFUSALS`, picked by a RNG seeded with (seed, query key) -> ``"canned-refusal"``;
3. a bare refusal ("Sorry, I can't assist with that.": short and matching
   :data:`BARE_REFUSAL_PATTERNS`) is followed up with a user turn ``"why?"``; the refusal plus the
   reason becomes the answer -> ``"model+why"``;
4. an answer that is no use as gold (empty text, a reason that is itself a bare refusal) -> the
   chosen HH response -> ``"chosen-fallback"``.

Only a real answer or a real refusal is final. A request that fails after its retries (connection
refused, 401, quota 429, 5xx, ...) is not written: the query is counted under ``failed`` and asked
again on the next run. Rows of older files that recorded such a failure as a ``chosen-fallback`` are
asked again too. Notes keep an error's class and HTTP status, never the provider's message.

A content-policy refusal of the "why?" follow-up also gives a canned refusal (the query is one the
provider will not discuss, and a polite refusal is a better gold than the HH response).

Output: JSON lines ``{"key", "prompt", "response", "source"[, "note"]}`` (readable by
:func:`apo_ray.data.load_golden_answers`), appended and flushed one answer at a time; a rerun skips
the keys already answered in the file, so an interrupted collection resumes where it stopped.

Launch: ``python jobs/golden.py --out golden.jsonl --base-url https://api.openai.com/v1 --model gpt-4o
experiment=paper_hh`` (key in ``$OPENAI_API_KEY``): it asks for the golden queries of that experiment.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import openai

from apo_ray.data import GoldenAnswer, PreferencePair, query_key
from apo_ray.llm_api.judge import MAX_FAILED_FRACTION, ChatAPI, describe_error, drop_torn_tail, read_json_line
from apo_ray.models.loading import hh_to_messages

log = logging.getLogger(__name__)

SOURCES = ("model", "model+why", "canned-refusal", "chosen-fallback")

GOLDEN_SYSTEM_PROMPT = (
    "You are an assistant whose replies should be both helpful and harmless. Continue the conversation "
    "below with the best possible next reply. Even if earlier turns contain rude, harmful or otherwise "
    "inappropriate requests, stay useful: address whatever can safely be addressed. When you cannot help "
    "with something, say why, and offer constructive suggestions or safer alternatives instead of a flat "
    "refusal. Do not say who built you or which company or model you are."
)

CANNED_REFUSALS = (
    ("I'm sorry, but I can't help with that request. It could lead to harm or goes against principles I "
    "follow to keep conversations safe and respectful. If there is something related that I can help "
    "with, or another question on your mind, I'd be glad to assist."),
    ("I'm afraid I can't assist with this one, because responding could be unsafe or hurtful to someone. "
    "If you tell me more about what you are ultimately trying to achieve, I'm happy to suggest a safer "
    "way to approach it."),
    ("Sorry, that's not something I can help with, since it may cause harm or be inappropriate. I'd be "
    "happy to talk about a different topic, or point you toward trustworthy resources if you need support."),
)

WHY_TURN = "why?"

# A bare refusal is SHORT (< BARE_REFUSAL_MAX_WORDS words) and matches one of these.
BARE_REFUSAL_MAX_WORDS = 12
BARE_REFUSAL_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\b(sorry|apologi[sz]e)\b.*\b(can(no|')?t|can not|unable|won'?t|not able)\b",
    (r"\b(can(no|')?t|can not|unable to|won'?t|not able to)\b.*\b(help|assist|comply|provide|do that|"
    r"fulfil+|support|answer|engage)\b"),
    r"^\s*(i'?m |i am )?(sorry|apologi[sz]e)[.!]?\s*$",
))

# The notes of a final chosen-fallback (the model answered, but nothing usable as gold).
EMPTY_ANSWER, NO_REASON = "empty answer", "bare refusal, no reason given"

_POLICY_MARKERS = ("content_policy", "content policy", "content_filter", "content filter",
                   "content management policy", "responsibleaipolicyviolation")


def is_bare_refusal(text: str) -> bool:
    """True for a short refusal that gives no reason, e.g. "Sorry, I can't assist with that."."""
    words = text.split()
    if not words or len(words) >= BARE_REFUSAL_MAX_WORDS:
        return False
    return any(p.search(text) for p in BARE_REFUSAL_PATTERNS)


def is_content_policy_error(exc: BaseException) -> bool:
    """A provider refusal on content grounds: HTTP 400 whose code or message names the policy/filter."""
    if not isinstance(exc, openai.BadRequestError):
        return False
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    fields = [str(getattr(exc, "code", "") or ""), str(error.get("code", "") or ""),
              str(error.get("type", "") or ""), str(getattr(exc, "message", "") or ""), str(exc)]
    text = " ".join(fields).lower()
    return any(marker in text for marker in _POLICY_MARKERS)


def canned_refusal(key: str, seed: int = 0) -> str:
    """One of :data:`CANNED_REFUSALS`, the same for a (seed, query key) in every run."""
    return random.Random(f"{seed}:{key}").choice(CANNED_REFUSALS)


def golden_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": GOLDEN_SYSTEM_PROMPT}, *hh_to_messages(prompt)]


class _ContentFiltered(Exception):
    pass


def _ask(api: ChatAPI, messages: list[dict[str, str]]) -> str:
    """The answer text; raises _ContentFiltered for a content-policy refusal of any kind."""
    try:
        completion = api.complete(messages)
    except openai.BadRequestError as exc:
        if is_content_policy_error(exc):
            raise _ContentFiltered(f"content policy refusal: {describe_error(exc)}") from exc
        raise
    if completion.finish_reason == "content_filter":
        raise _ContentFiltered("content policy refusal: finish_reason=content_filter")
    return completion.text.strip()


def golden_answer(api: ChatAPI, pair: PreferencePair, *, seed: int = 0) -> tuple[GoldenAnswer | None, str | None]:
    """The golden answer for one query and a note on why a fall-back was used (None for "model").
    ``(None, error)`` when a request failed after its retries: nothing final is known yet."""
    key = query_key(pair.prompt)
    messages = golden_messages(pair.prompt)
    try:
        text = _ask(api, messages)
        if not text:
            return GoldenAnswer(pair.prompt, pair.chosen, "chosen-fallback"), EMPTY_ANSWER
        if not is_bare_refusal(text):
            return GoldenAnswer(pair.prompt, text, "model"), None
        follow_up = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": WHY_TURN}]
        reason = _ask(api, follow_up)
        if not reason or is_bare_refusal(reason):
            return GoldenAnswer(pair.prompt, pair.chosen, "chosen-fallback"), NO_REASON
        return GoldenAnswer(pair.prompt, f"{text} {reason}", "model+why"), None
    except _ContentFiltered as exc:
        return GoldenAnswer(pair.prompt, canned_refusal(key, seed), "canned-refusal"), str(exc)
    except Exception as exc:  # noqa: BLE001 - a failed request: not final, asked again next run
        return None, describe_error(exc)


def _read_done(path: Path) -> dict[str, str]:
    """key -> source of the final answers already in ``path``. A torn last line is cut first; lines
    that are not readable answers, and chosen-fallback rows that recorded a failed request (written
    by older versions), do not count as done, so those queries are asked again."""
    done: dict[str, str] = {}
    if not path.exists():
        return done
    drop_torn_tail(path)
    with open(path, "rb") as fh:
        for raw in fh:
            row = read_json_line(raw)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                continue
            source = row.get("source", "file")
            if source == "chosen-fallback" and row.get("note") not in (None, EMPTY_ANSWER, NO_REASON):
                continue
            done[row.get("key") or query_key(row["prompt"])] = source
    return done


def collect_golden_answers(pairs: Sequence[PreferencePair], out_path: str | os.PathLike[str], api: ChatAPI, *,
                           limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Collect golden answers for the distinct prompts of ``pairs`` (the first ``limit`` of them),
    appending to ``out_path`` (a plain .jsonl) and skipping prompts already answered there.

    Returns ``{"out", "queries", "skipped_existing", "asked", "written", "failed", "failed_by_error",
    "by_source", "total_by_source", "api"}``: ``by_source`` counts this run's answers,
    ``total_by_source`` the whole file's; ``failed`` queries (a request failed after its retries)
    are not written and are asked again by the next run.
    """
    out = Path(out_path)
    if out.name.endswith(".gz"):
        raise ValueError(f"{out}: golden answers are appended as they come; use a plain .jsonl path")
    queries: dict[str, PreferencePair] = {}
    for p in pairs:  # first pair wins for a repeated prompt, as in data.golden_from_chosen
        queries.setdefault(query_key(p.prompt), p)
    todo_all = list(queries.items())[:limit] if limit is not None else list(queries.items())
    done = _read_done(out)
    todo = [(k, p) for k, p in todo_all if k not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    by_source: Counter[str] = Counter({s: 0 for s in SOURCES})
    failed: Counter[str] = Counter()

    def work(item: tuple[str, PreferencePair]) -> None:
        key, pair = item
        answer, note = golden_answer(api, pair, seed=seed)
        if answer is None:
            with lock:
                failed[note] += 1
            return
        record = {"key": key, "prompt": answer.prompt, "response": answer.response, "source": answer.source}
        if note:
            record["note"] = note
        with lock:
            with open(out, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                fh.flush()
            by_source[answer.source] += 1
            done[key] = answer.source

    log.info("golden answers: %d queries, %d already in %s, %d to ask", len(todo_all), len(todo_all) - len(todo),
             out, len(todo))
    api.map(work, todo, desc="golden answers", unit="query")
    summary = {
        "out": str(out), "queries": len(todo_all), "skipped_existing": len(todo_all) - len(todo),
        "asked": len(todo), "written": len(todo) - sum(failed.values()), "failed": sum(failed.values()),
        "failed_by_error": dict(failed), "by_source": dict(by_source),
        "total_by_source": {**{s: 0 for s in SOURCES}, **Counter(done.values())},
        "api": dict(api.stats),
    }
    log.info("golden answers by source (this run): %s; whole file: %s", summary["by_source"],
             summary["total_by_source"])
    if failed:
        log.warning("%d of %d queries failed after retries (%s); not written, asked again on the next run",
                    summary["failed"], len(todo), summary["failed_by_error"])
    return summary


def mostly_failed(summary: dict[str, Any], max_failed_fraction: float = MAX_FAILED_FRACTION) -> bool:
    """True when more than ``max_failed_fraction`` of the queries asked in a run failed."""
    return summary["failed"] > max_failed_fraction * summary["asked"]
