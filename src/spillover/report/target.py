"""The report's first section: what the alignment did to its target, and what a run can show.

Read from ``stats/heldout_target.json`` (the target's items on held-out scenarios, their
comparison and the collapse guard) and the manifest (which model ran). The sentences are
generated from those records, as the summary's are from the comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models import model_info
from ..stats import ALL, COLLAPSE_SHARE, UNKNOWN_RISE, Comparison, StratumRecord
from .values import fmt_p

SMALL_MODEL_CAVEAT = (
    "The model is the embedded SmolLM2-135M-Instruct, which answers BBQ near chance: this run "
    "demonstrates the pipeline; it is not evidence about spillover. Run a 7-8B model "
    "(configs/paper.yaml) for conclusions."
)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _context_line(rec: StratumRecord, fine: StratumRecord | None = None) -> str:
    """One context's held-out target change; ``fine``: the target category's own row of
    that context (power is computed on the finest rows only)."""
    verdict = "significant" if rec.significant else "not significant"
    p = fmt_p(rec.p_value) if rec.p_value == rec.p_value else "n/a"
    interval = f"{100 * rec.delta_accuracy_ci_low:+.1f} to {100 * rec.delta_accuracy_ci_high:+.1f}"
    power = rec if rec.mdc_accuracy is not None or fine is None else fine
    if power.mdc_accuracy is not None:
        mdc = (
            f"; the test detects a change of ±{100 * power.mdc_accuracy:.1f} points with 80 % power"
        )
    elif power is fine:
        mdc = "; no change is detectable with 80 % power here (too few items or scenarios)"
    else:
        mdc = ""
    return (
        f"{rec.context_condition}: accuracy {_pct(rec.acc_base)} → {_pct(rec.acc_aligned)} "
        f"({100 * rec.delta_accuracy:+.1f} points, interval {interval} ({rec.ci_method}), p = {p}, "
        f"{verdict}; {rec.n} items, {rec.n_clusters} scenarios{mdc}), 'unknown' answers "
        f"{_pct(rec.unknown_rate_base)} → {_pct(rec.unknown_rate_aligned)}"
    )


def _shares(side: Mapping[str, Any]) -> str:
    shares = side.get("position_share") or []
    return "/".join(f"{100 * float(x):.0f}" for x in shares) + " %"


def _mix_line(mix: Mapping[str, Any]) -> str | None:
    """The answer mix on the target's held-out items, when the collapse guard did not fire."""
    base, aligned = mix.get("base"), mix.get("aligned")
    if not isinstance(base, Mapping) or not isinstance(aligned, Mapping):
        return None
    return (
        f"Answer mix on those {mix.get('n', 0)} items: 'unknown' chosen {_pct(base.get('unknown_share'))}"
        f" → {_pct(aligned.get('unknown_share'))} of the time (disambiguated: "
        f"{_pct(base.get('disambig_unknown_rate'))} → {_pct(aligned.get('disambig_unknown_rate'))}),"
        f" answer positions A/B/C {_shares(base)} → {_shares(aligned)}. The collapse guard "
        f"(one answer kind on more than {100 * COLLAPSE_SHARE:.0f} % of items, or disambiguated "
        f"'unknown' up by more than {100 * UNKNOWN_RISE:.0f} points) did not fire."
    )


def _is_small_model(manifest: Mapping[str, Any] | None) -> bool:
    if manifest is None:
        return False
    sub = manifest.get("sub_run")
    names = [sub.get("model")] if isinstance(sub, Mapping) else []
    for m in manifest.get("models") or []:
        if isinstance(m, Mapping):
            names += [m.get("model"), m.get("name"), m.get("model_id"), m.get("hub_id")]
    infos = (model_info(n) for n in names if isinstance(n, str))
    return any(info is not None and info.demo_only for info in infos)


def alignment_lines(
    summary: Mapping[str, Any] | None, manifest: Mapping[str, Any] | None
) -> list[dict[str, str]]:
    """Sentences of "what the alignment did": the collapse guard first, then the target on
    held-out scenarios per context with its size, the in-sample items apart, the caveats."""
    lines: list[dict[str, str]] = []
    if _is_small_model(manifest):
        lines.append({"cls": "", "text": SMALL_MODEL_CAVEAT})
    if summary is None:
        return lines
    mix = summary.get("answer_mix")
    if isinstance(mix, Mapping) and mix.get("collapsed"):
        reasons = "; ".join(str(r) for r in mix.get("reasons") or [])
        lines.insert(
            0,
            {
                "cls": "bad",
                "text": f"Collapse guard: on the target's held-out scenarios {reasons}. "
                f"The spillover below describes a collapsed model, not a fairer one; "
                f"{mix.get('advice')}.",
            },
        )
    targets = ", ".join(summary.get("targets") or [])
    comp = summary.get("comparison")
    if comp is None:
        lines.append({"cls": "", "text": f"Target ({targets}): {summary.get('note', '')}"})
    else:
        rows = Comparison.from_json(comp, "stats/heldout_target.json").rows
        pooled = [r for r in rows if r.category == ALL and r.context_condition != ALL]
        # power is computed on the finest rows: with one target category its row per
        # context holds the same items as the pooled one
        fine: dict[str, list[StratumRecord]] = {}
        for r in rows:
            if r.category != ALL and r.context_condition != ALL and r.question_polarity is None:
                fine.setdefault(r.context_condition, []).append(r)
        own = {c: rs[0] for c, rs in fine.items() if len(rs) == 1}
        n = summary.get("n_items", 0)
        head = (
            f"Target ({targets}) on scenarios held out of training ({n} items; the honest "
            "test of whether the alignment worked):"
        )
        lines.append(
            {
                "cls": "",
                "text": " ".join(
                    [head, *(_context_line(r, own.get(r.context_condition)) + "." for r in pooled)]
                ),
            }
        )
    if isinstance(mix, Mapping) and not mix.get("collapsed"):
        line = _mix_line(mix)
        if line:
            lines.append({"cls": "", "text": line})
    in_sample = summary.get("in_sample")
    if isinstance(in_sample, Mapping):
        lines.append(
            {
                "cls": "",
                "text": f"{summary.get('n_in_sample', 0)} evaluated target items lie on "
                "scenarios the model was trained on: in-sample, not evidence of "
                "generalisation; they are left out of every table below "
                "(stats/heldout_target.json keeps their comparison).",
            }
        )
    return lines
