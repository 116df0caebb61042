"""A judge checked before it speaks: its verdicts on the split's labelled pairs (chosen against rejected, each pair
in both orders for a pairwise judge) give its agreement with the labels, with a bootstrap interval over prompts, and
its first-position share. A judge whose agreement interval reaches 0.5, or that picks one position nearly always,
is flagged uninformative: `iopo eval` stores the check beside its verdicts and says so in every table."""

from __future__ import annotations

from iopo.core import stats
from iopo.data.tokenize import prompt_key
from iopo.eval.judges.compare import judge_against

# A verdict for the labelled chosen answer against the rejected one; a rubric's "bad" (both scored 0) is a tie here.
VERDICT_VALUE = {"win": 1.0, "tie": 0.5, "bad": 0.5, "lose": 0.0}


def answer_text(answer) -> str:
    """A labelled answer as a judge reads it: the text, or the content of its assistant messages."""
    if isinstance(answer, str):
        return answer
    return "\n".join(m["content"] for m in answer if isinstance(m.get("content"), str))


def check_judge(judge, store, session: str, jcfg, pairs, *, boot: dict, progress) -> dict:
    """The judge's agreement with the labels of the first jcfg.check_pairs pairs and its first-position share: the
    chosen answers judged against the rejected ones exactly as `iopo eval` judges a model against its baseline
    (judge_against: both orders and MT-Bench's rule for a pairwise judge, else its scores' verdict), then grouped by
    prompt for the interval."""
    labelled = pairs[: jcfg.check_pairs]
    if not labelled:
        return stats.judge_check([], None, 0, boot["confidence"], boot["seed"], jcfg.position_limit)
    chosen = [{"prompt": p.prompt, "answer": answer_text(p.chosen)} for p in labelled]
    rejected = [{"prompt": p.prompt, "answer": answer_text(p.rejected)} for p in labelled]
    modes = ["pairwise"] if "pairwise" in judge.modes else ["score"]
    tables = judge_against(
        judge, store, session, jcfg, chosen, rejected, n=1, boot=boot, progress=progress, modes=modes
    )
    table = tables.get("table1") or tables["table2"]
    verdicts = [group[0] for group in table["outcomes"]]  # n=1: one verdict per labelled pair
    index: dict[str, int] = {}
    prompt_of = [index.setdefault(prompt_key(p.prompt), len(index)) for p in labelled]
    by_prompt: list[list[float]] = [[] for _ in index]
    for verdict, k in zip(verdicts, prompt_of, strict=True):
        if verdict in VERDICT_VALUE:
            by_prompt[k].append(VERDICT_VALUE[verdict])
    out = stats.judge_check(
        by_prompt,
        table.get("first_position_share"),
        boot["n_boot"],
        boot["confidence"],
        boot["seed"],
        jcfg.position_limit,
    )
    out["invalid"] = sum(v not in VERDICT_VALUE for v in verdicts)
    out["requests"] = table["requests"]
    return out


def check_line(name: str, check: dict) -> str:
    """One line for the log: what the check found and whether the judge's verdicts mean anything."""
    if not check["pairs"]:
        return f"judge {name}: not checked (no labelled pair was judged validly)"
    low, high = check["agreement_ci"]
    text = (
        f"judge {name}: agrees with the labels on {check['agreement']:.3f} [{low:.3f}, {high:.3f}] of "
        f"{check['pairs']} labelled pairs ({check['prompts']} prompts)"
    )
    if check.get("first_position_share") is not None:
        text += f", picks the first answer {check['first_position_share']:.3f} of the time"
    if check["informative"]:
        return text + ": informative"
    return (
        text + ": UNINFORMATIVE (" + "; ".join(check["reasons"]) + "); its verdicts below carry no evidence"
    )
