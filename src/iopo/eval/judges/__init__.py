"""Judges by name (reward_model, openai, local, function) and the cached runner that asks them only what the store lacks."""

from __future__ import annotations

import json

from iopo.eval.judges.base import Judge
from iopo.io.store import judgment_key


def _openai(name: str, cfg, dtype: str, trust_remote_code: bool) -> Judge:
    from iopo.eval.judges.openai import OpenAIJudge

    return OpenAIJudge(name, cfg)


def _reward_model(name: str, cfg, dtype: str, trust_remote_code: bool) -> Judge:
    from iopo.eval.judges.reward_model import RewardModelJudge

    return RewardModelJudge(name, cfg, dtype, trust_remote_code)


def _local(name: str, cfg, dtype: str, trust_remote_code: bool) -> Judge:
    from iopo.eval.judges.local import LocalJudge

    return LocalJudge(name, cfg, dtype, trust_remote_code)


def _function(name: str, cfg, dtype: str, trust_remote_code: bool) -> Judge:
    from iopo.eval.judges.function import FunctionJudge

    return FunctionJudge(name, cfg)


# One constructor per judge type of the config's JUDGE_TYPES (its facts: what the judge answers and how).
BUILDERS = {"openai": _openai, "reward_model": _reward_model, "local": _local, "function": _function}


def build_judge(name: str, cfg, dtype: str = "float32", trust_remote_code: bool = False) -> Judge:
    """The judge of a JudgeConfig, picked by its type; it carries its type's facts (`judge.facts`)."""
    judge = BUILDERS[cfg.type](name, cfg, cfg.dtype or dtype, trust_remote_code)
    judge.facts = cfg.facts
    return judge


def _keys(judge: Judge, kind: str, items: list[tuple]) -> list[str]:
    return [
        judgment_key(judge.judge_id, kind, item[0], item[1], item[2] if kind == "pairwise" else None)
        for item in items
    ]


def pending(judge: Judge, store, kind: str, items: list[tuple]) -> int:
    """How many requests run_judge would make for these items: the distinct ones the store has no judgment for."""
    keys = set(_keys(judge, kind, items))
    return len(keys) - len(store.judgments(list(keys)))


def run_judge(
    judge: Judge, store, kind: str, items: list[tuple], session: str, progress: bool = True
) -> tuple[list[dict], dict]:
    """Results for every item (pairwise: (prompt, a, b); score: (prompt, answer)), asking the judge only for the
    items the store lacks (identical items once) and storing each result, with its ledger row, as it arrives.

    Returns (results in item order, {"new": n asked, "reused": n found in the store}).
    """
    keys = _keys(judge, kind, items)
    found = store.judgments(keys)
    missing: dict[str, tuple] = {}
    for key, item in zip(keys, items, strict=True):
        if key not in found and key not in missing:
            missing[key] = item
    todo_keys, todo = list(missing), list(missing.values())
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"judge {judge.name} ({kind})", unit="judgment", dynamic_ncols=True)
    ask = judge.pairwise if kind == "pairwise" else judge.score
    try:
        for index, result, spent in ask(todo):
            item, key = todo[index], todo_keys[index]
            store.put_judgment(
                key,
                judge=judge.name,
                judge_id=judge.judge_id,
                kind=kind,
                prompt=json.dumps(item[0], ensure_ascii=False) if not isinstance(item[0], str) else item[0],
                answer_a=item[1],
                answer_b=item[2] if kind == "pairwise" else None,
                result=result,
                usage=spent,
                session=session,
            )
            found[key] = result
            if bar is not None:
                bar.update(1)
    except Exception as error:  # a request that failed for good still cost requests and time: into the ledger
        if getattr(error, "attempts", 0):
            spent = {"requests": error.attempts, "seconds": getattr(error, "seconds", 0.0)}
            store.add_ledger(session=session, judge=judge.name, kind=kind, usage=spent)
        raise
    finally:
        if bar is not None:
            bar.close()
    return [found[key] for key in keys], {"new": len(todo), "reused": len(items) - len(todo)}
