"""Cron schedule validation as Kubernetes CronJobs parse it (robfig/cron v3 ``ParseStandard``).

Five fields (minute hour day-of-month month day-of-week), each a list of ``*``, ``?``, ``N``,
``N-M``, each optionally ``/STEP``; month and weekday accept names (``JAN``, ``MON``); the
descriptors ``@yearly @annually @monthly @weekly @daily @midnight @hourly`` and ``@every DURATION``.
Kubernetes refuses ``TZ=``/``CRON_TZ=`` prefixes in ``.spec.schedule`` (use ``.spec.timeZone``).
Pure: returns an error message or None.
"""

from __future__ import annotations

import re

_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    (
        "month",
        1,
        12,
        {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
    ),
    ("day of week", 0, 6, {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+")


def cron_error(schedule: str) -> str | None:
    """Why ``schedule`` is not a valid CronJob schedule, or None if it is."""
    text = schedule.strip()
    if not text:
        return "the schedule is empty"
    if text.startswith(("TZ=", "CRON_TZ=")):
        return "a time zone prefix (TZ=/CRON_TZ=) is not supported in a CronJob schedule"
    if text.startswith("@"):
        if text.lower() in _DESCRIPTORS:
            return None
        if text.lower().startswith("@every "):
            duration = text[len("@every ") :].strip()
            if _DURATION.fullmatch(duration):
                return None
            return f"{duration!r} is not a duration (e.g. 1h30m)"
        return f"unknown descriptor {text.split()[0]!r} (valid: {', '.join(sorted(_DESCRIPTORS))}, @every)"
    fields = text.split()
    if len(fields) != 5:
        return (
            f"expected 5 fields (minute hour day-of-month month day-of-week), found {len(fields)}"
        )
    for value, (name, low, high, names) in zip(fields, _FIELDS):
        if err := _field_error(value, low, high, names):
            return f"{name} field {value!r}: {err}"
    return None


def _field_error(field: str, low: int, high: int, names: dict[str, int]) -> str | None:
    for part in field.split(","):
        if not part:
            return "empty list element"
        span, slash, step = part.partition("/")
        if slash:
            if not step.isdigit() or int(step) == 0:
                return f"step {step!r} must be a positive number"
        if span in ("*", "?"):
            continue
        start_text, dash, end_text = span.partition("-")
        start = _number(start_text, names)
        if start is None:
            return f"{start_text!r} is not a number or name"
        end = start
        if dash:
            parsed_end = _number(end_text, names)
            if parsed_end is None:
                return f"{end_text!r} is not a number or name"
            end = parsed_end
        if not (low <= start <= high and low <= end <= high):
            return f"{span!r} is outside {low}-{high}"
        if start > end:
            return f"range {span!r} starts after it ends"
        if slash and not dash:
            # robfig: "N/step" means N through the maximum, which is valid.
            continue
    return None


def _number(text: str, names: dict[str, int]) -> int | None:
    if text.isdigit():
        return int(text)
    return names.get(text.lower())
