"""The gold-reward testbed: where the truth is known. The DPO paper's controlled-sentiment setting (Sec. 6.1, Fig. 2)
rebuilt offline on the embedded model, with corrupted annotators for IOPO's claim. Settings: experiments/gold.yaml.

    python experiments/gold.py                  # every table, then the results (JSON, PNG, docs/results.md's tables)
    python experiments/gold.py clean            # one table
    python experiments/gold.py --list           # every run and checkpoint evaluation, done or not
    python experiments/gold.py --report-only    # the results from what is done, nothing run
    python experiments/gold.py --smoke --model DIR --work-dir D   # the pipeline on a tiny model (the CI test)

Stages, each kept on disk and skipped when done (a killed command continues where it stopped):
1. prompts: openings of reviews from a template (subjects x openings); the held-out subjects are never trained on.
2. samples: the starting model continues every training prompt `per_prompt` times (iopo's generation, resumable).
3. pairs: per annotator, disjoint pairs of those continuations, labelled (Bradley-Terry on the gold reward, flips, a
   length-preferring annotator, a half-length mixture); pairs/<annotator>.jsonl, with how often the label agrees
   with the gold reward.
4. runs: `iopo train` per table x annotator x method x seed, a checkpoint every save_steps optimizer steps.
5. evaluation: every checkpoint (and the starting model) samples continuations of the held-out prompts; each gets
   the gold reward and its sampled KL to the starting model, sum over its tokens of log pi - log pi_ref (an unbiased
   estimate of KL(pi || pi_ref) per prompt, the samples being pi's own: temperature 1, no top-p, no top-k).
Results: experiments/gold_analysis.py.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gold_analysis import finished_record, scored_all, write_gold_results  # noqa: E402
from suite import (  # noqa: E402  experiments/suite.py
    Run,
    SuiteError,
    _merge,
    _rel,
    execute,
    experiment_parser,
    resolve_spec,
    same_command,
)

SUBJECTS = """
the new Batman movie
a small Italian restaurant downtown
my new running shoes
the hotel we stayed at
a cheap phone charger
the local bus service
a mystery novel I just finished
the airport lounge
the city museum
a budget laptop
the neighborhood gym
an online cooking class
the new coffee shop
a sci-fi TV series
the concert last weekend
a wireless headset
the rental car
a weekend cruise
the public library
a video game sequel
a meal-kit delivery
the dentist's office
a stand-up comedy show
a camping tent
the town's farmers market
an animated family film
a language-learning app
the sushi bar on Main Street
a used bicycle
the furniture store
a fantasy novel series
the theme park
a cordless vacuum
the train to the coast
the pizza place near campus
a jazz album
the new smartphone
a yoga retreat
the car wash
a documentary about oceans
the bakery downtown
a board game
the hair salon
an electric kettle
the zoo
a horror movie
the bookstore cafe
a pair of jeans
the ski resort
a podcast about history
the hardware store
a romantic comedy
""".strip().split("\n")  # what is reviewed: one per line
OPENINGS = [
    'Review of {s}: "I tried it last week, and',
    'My honest opinion of {s}: "',
    'Review of {s}: "After a month, I can say that',
    'Customer review of {s}: "To be honest,',
    'What I think about {s}: "The first thing I noticed was',
    'Review of {s}: "My family went there, and',
    'A short review of {s}: "Well,',
    'Review of {s}: "I expected a lot, and',
]


# ---------------------------------------------------------------- spec


def load_spec(path: Path, smoke: bool) -> dict:
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    smoke_spec = spec.pop("smoke", {})
    if smoke:
        tables = smoke_spec.pop("tables", None)
        spec = _merge(spec, smoke_spec)
        if tables is not None:
            spec["tables"] = tables
    return spec


# ---------------------------------------------------------------- the gold reward


_ANALYZER = None


def gold_reward(text: str) -> float:
    """VADER's compound sentiment score of a continuation: -1 (most negative) .. +1 (most positive)."""
    global _ANALYZER
    if _ANALYZER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise SuiteError("the gold reward needs vaderSentiment: pip install 'iopo[bench]'") from None
        _ANALYZER = SentimentIntensityAnalyzer()
    return float(_ANALYZER.polarity_scores(text)["compound"])


# ---------------------------------------------------------------- prompts, samples, pairs


def make_prompts(spec: dict) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]}: {"prompt_id", "prompt", "subject"}; the test subjects are never trained on."""
    p = spec["prompts"]
    subjects = list(SUBJECTS)
    random.Random("gold-subjects").shuffle(subjects)
    held_out = set(subjects[: p["test_subjects"]])
    prompts = [
        {"prompt_id": f"s{SUBJECTS.index(s):02d}-o{j}", "prompt": o.format(s=s), "subject": s}
        for s in subjects
        for j, o in enumerate(OPENINGS)
    ]
    random.Random("gold-prompts").shuffle(prompts)
    test = [x for x in prompts if x["subject"] in held_out][: p["test_prompts"]]
    train = [x for x in prompts if x["subject"] not in held_out][: p["train_prompts"]]
    if len(test) < p["test_prompts"] or len(train) < p["train_prompts"]:
        raise SuiteError(
            f"the template makes {len(held_out) * len(OPENINGS)} test and "
            f"{(len(SUBJECTS) - len(held_out)) * len(OPENINGS)} training prompts; gold.yaml asks more"
        )
    return {"train": train, "test": test}


def sample_training_answers(spec: dict, work: Path, model: str | None, prompts: list[dict]) -> list[dict]:
    """The starting model's continuations of the training prompts (iopo's resumable generation)."""
    from iopo.config import GenerationConfig
    from iopo.eval.generate import generate_answers

    s = spec["samples"]
    gen = GenerationConfig(
        temperature=s["temperature"],
        top_p=1.0,
        max_new_tokens=s["max_new_tokens"],
        n=s["per_prompt"],
        batch_size=s["batch_size"],
        seed=s["seed"],
    )
    records, _ = generate_answers(
        model,
        [{"prompt_id": x["prompt_id"], "prompt": x["prompt"]} for x in prompts],
        gen,
        work / "samples" / "start.jsonl",
        max_prompt_length=spec["common"]["data.max_prompt_length"],
        progress=False,
    )
    return records


def length_score(text: str, scale: float) -> float:
    """A length preference in [-1, 1]: tanh of the characters over the samples' median length, centred."""
    return math.tanh(len(text) / scale - 1.0)


def label_pairs(records: list[dict], annotator: dict, seed: str) -> tuple[list[dict], dict]:
    """Disjoint pairs (samples 0-1, 2-3, ...) of each prompt, labelled by the annotator; pairs of equal continuations
    make no pair. Returns (rows for pairs.jsonl, a report: pairs, how many labels agree with the gold reward)."""
    by_prompt: dict[str, list[dict]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    lengths = sorted(len(r["answer"]) for r in records)
    scale = max(1.0, float(lengths[len(lengths) // 2]))
    rng = random.Random(f"annotator:{seed}")
    rows, agree, gold_ties, equal = [], 0, 0, 0
    for pid in sorted(by_prompt):
        samples = sorted(by_prompt[pid], key=lambda r: r["sample"])
        for a, b in zip(samples[0::2], samples[1::2], strict=False):
            if a["answer"].strip() == b["answer"].strip():
                equal += 1
                continue
            ga, gb = gold_reward(a["answer"]), gold_reward(b["answer"])
            if annotator.get("longer"):
                first = len(a["answer"]) > len(b["answer"]) or (
                    len(a["answer"]) == len(b["answer"]) and rng.random() < 0.5
                )
            else:
                w = float(annotator.get("length_weight", 0.0))
                ra = (1 - w) * ga + w * length_score(a["answer"], scale)
                rb = (1 - w) * gb + w * length_score(b["answer"], scale)
                z = (ra - rb) / float(annotator["temperature"])
                first = rng.random() < 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))
            if rng.random() < float(annotator.get("flip", 0.0)):
                first = not first
            chosen, rejected = (a, b) if first else (b, a)
            g_chosen, g_rejected = (ga, gb) if first else (gb, ga)
            agree += g_chosen > g_rejected
            gold_ties += g_chosen == g_rejected
            rows.append({"prompt": a["prompt"], "chosen": chosen["answer"], "rejected": rejected["answer"]})
    n = len(rows)
    report = {
        "pairs": n,
        "equal_continuations_skipped": equal,
        "agree_with_gold": agree / n if n else None,  # the chosen has the higher gold reward
        "gold_ties": gold_ties,
        "chosen_longer": sum(len(r["chosen"]) > len(r["rejected"]) for r in rows) / n if n else None,
    }
    return rows, report


def write_pairs(spec: dict, work: Path, records: list[dict]) -> dict[str, dict]:
    from iopo.io.jsonio import write_json, write_jsonl

    out = {}
    for name, annotator in spec["annotators"].items():
        rows, report = label_pairs(records, annotator, seed=name)
        path = work / "pairs" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, rows)
        out[name] = {"file": _rel(path), "annotator": annotator, **report}
    write_json(work / "pairs" / "report.json", out)
    return out


# ---------------------------------------------------------------- runs


ONLINE_ONLY_OFF = ("save_total_limit", "eval_steps")  # train-only settings an `iopo online` run does not take


def train_runs(spec: dict, work: Path, model: str | None, pairs: dict, tables: list[str]) -> list[Run]:
    """`iopo train` per table x annotator x seed x method, or `iopo online` for a method with `rounds` (its
    checkpoints: one per round, kept)."""
    runs = []
    for table in tables:
        t = spec["tables"][table]
        for annotator in t["annotators"]:
            for seed in t.get("seeds", spec["seeds"]):
                for method in t["methods"]:
                    key = f"{annotator}/seed-{seed}/{method}"
                    folder = work / "runs" / key
                    own = dict(spec["methods"][method])
                    factor = own.pop("steps_factor", 1)  # IOPO at equal policy steps: both players' steps
                    own.pop("diagnostic", None)  # read by the analysis (no contrast), not by iopo
                    common = {
                        **spec["common"],
                        **({"model.name_or_path": model} if model else {}),
                        **own,
                        "data.path": _rel(work / "pairs" / f"{annotator}.jsonl"),
                        "data.test_path": _rel(work / "pairs" / "test.jsonl"),
                    }
                    if "rounds" in own:  # online: a checkpoint per round of steps_per_round steps, all kept
                        for name in ONLINE_ONLY_OFF:
                            common.pop(name, None)
                        settings = {**common, "keep_checkpoints": own["rounds"], "seed": seed}
                        runs.append(Run(key, "online", settings | {"output_dir": _rel(folder)}, folder))
                        continue
                    settings = {
                        **common,
                        "optim.max_steps": spec["steps"] * factor,
                        "save_steps": spec["save_steps"] * factor,
                        "eval_reference_cache": _rel(work / "reference-logps"),
                        "seed": seed,
                        "output_dir": _rel(folder),
                        "resume": True,
                    }
                    runs.append(Run(key, "train", settings, folder))
    return runs


def gold_judge(prompt, answer: str) -> float:
    """The gold reward as an iopo function judge (judge.type=function): the online rounds' annotator."""
    return gold_reward(answer)


# ---------------------------------------------------------------- evaluation: gold reward and sampled KL


class Scorer:
    """Samples continuations of the held-out prompts from a model and scores each with the gold reward and its
    sampled KL to the starting model (log-probs of the sampled tokens under both, in float32)."""

    def __init__(self, spec: dict, prompts: list[dict], start: str | None):
        import torch

        from iopo.io.models import load_inference_model, resolve_model

        self.spec, self.prompts = spec, prompts
        self.reference, self.tokenizer = load_inference_model(resolve_model(start))
        self.torch = torch

    def _logps(self, model, ids, mask, width):
        """Per sequence: the summed log-prob of its sampled tokens (positions >= width, mask 1)."""
        torch = self.torch
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, width - 1 : -1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, width:, None])[..., 0]
        return (logp * mask[:, width:]).sum(-1)

    def score(self, spec_model: str | None) -> dict:
        from iopo.data.collate import pad_sequences
        from iopo.eval.generate import _stop_ids
        from iopo.io.models import load_inference_model, resolve_model

        torch = self.torch
        e = self.spec["evaluation"]
        model = self.reference
        if spec_model is not None:
            model, _ = load_inference_model(resolve_model(spec_model))
        tok = self.tokenizer
        stop = _stop_ids(self.reference, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else stop[0]
        limit = self.spec["common"]["data.max_prompt_length"]
        encoded = [tok(p["prompt"])["input_ids"][-limit:] for p in self.prompts]
        out: dict[str, dict] = {}
        for start in range(0, len(self.prompts), e["batch_size"]):
            chunk = list(range(start, min(start + e["batch_size"], len(self.prompts))))
            ids, mask = pad_sequences([encoded[i] for i in chunk], pad, "left")  # (B, T)
            width = ids.shape[1]
            torch.manual_seed(e["seed"] + start)
            with torch.inference_mode():
                seqs = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    do_sample=True,
                    temperature=e["temperature"],
                    top_p=1.0,
                    top_k=0,
                    max_new_tokens=e["max_new_tokens"],
                    num_return_sequences=e["samples_per_prompt"],
                    pad_token_id=pad,
                    eos_token_id=stop,
                )  # (B*n, T + new)
            new = seqs[:, width:]
            # a sample's tokens: up to and including its first stop token
            is_stop = torch.isin(new, torch.tensor(stop))
            after_stop = (is_stop.cumsum(-1) - is_stop.long()) > 0
            kept = (~after_stop).long()
            full_mask = torch.cat([mask.repeat_interleave(e["samples_per_prompt"], 0), kept], 1)
            lp_policy = self._logps(model, seqs, full_mask, width)
            lp_ref = self._logps(self.reference, seqs, full_mask, width)
            for row in range(new.shape[0]):
                prompt = self.prompts[chunk[row // e["samples_per_prompt"]]]
                tokens = new[row][kept[row].bool()].tolist()
                text = tok.decode([t for t in tokens if t not in stop], skip_special_tokens=True)
                entry = out.setdefault(prompt["prompt_id"], {"gold": [], "kl": [], "chars": []})
                entry["gold"].append(gold_reward(text))
                entry["kl"].append(float(lp_policy[row] - lp_ref[row]))
                entry["chars"].append(len(text))
                if row % e["samples_per_prompt"] == 0 and len(out) <= 3:
                    entry["example"] = text
        return out


def checkpoints_of(run: Run) -> list[tuple[int, Path]]:
    """(optimizer step, checkpoint folder) of a finished run: its checkpoints/step-N, or an online run's kept
    round_k/checkpoint (step k x steps_per_round)."""
    from iopo.io.checkpoint import list_checkpoints

    if run.command == "online":
        per_round = int(run.settings["steps_per_round"])
        rounds = [p for p in run.folder.glob("round_*") if (p / "checkpoint").is_dir()]
        return sorted((int(p.name.split("_")[1]) * per_round, p / "checkpoint") for p in rounds)
    return sorted((int(path.name.split("-")[1]), path) for path in list_checkpoints(run.folder))


def record_of(results: Path, run: Run) -> dict | None:
    """The committed record of a run trained and scored earlier, perhaps in another checkout (the runs folder is not
    committed): results/scores/RUN/run.json, when every checkpoint it lists has its score file. Such a run is not
    trained again."""
    return finished_record(results / "scores" / run.key)


def write_record(results: Path, run: Run) -> None:
    """Commit a finished, fully scored run's record beside its scores: the command, its wall and CPU seconds, its
    checkpoints (what `record_of` reads back in a fresh checkout, and what the results count as compute)."""
    from iopo.io.jsonio import write_json

    done = run.done()
    steps = [step for step, _ in checkpoints_of(run)]
    folder = results / "scores" / run.key
    if done is None or not scored_all(folder, steps):
        return
    record = {k: done.get(k) for k in ("command", "seconds", "cpu_seconds", "finished")}
    write_json(folder / "run.json", {**record, "checkpoints": steps})


def forget_scores(results: Path, run: Run) -> None:
    """A run trained again: its earlier score files and record (written by this command) no longer describe it."""
    folder = results / "scores" / run.key
    for path in [*folder.glob("step-*.json"), folder / "run.json"]:
        path.unlink(missing_ok=True)


def evaluate_runs(spec: dict, work: Path, results: Path, runs: list[Run], scorer) -> float:
    """Score the starting model and every checkpoint of every finished run that has no score file yet."""
    from iopo.io.jsonio import write_json

    spent = 0.0
    todo: list[tuple[str, str | None, Path]] = [("start", None, results / "scores" / "start.json")]
    for run in runs:
        if run.done() is None:
            continue
        for step, path in checkpoints_of(run):
            todo.append(
                (f"{run.key}/step-{step}", str(path), results / "scores" / run.key / f"step-{step}.json")
            )
    for key, model, target in todo:
        if target.is_file():
            continue
        tick = time.time()
        scores = scorer().score(model)
        seconds = time.time() - tick
        spent += seconds
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, {"model": key, "seconds": seconds, "per_prompt": scores})
        gold = [g for v in scores.values() for g in v["gold"]]
        kl = [k for v in scores.values() for k in v["kl"]]
        print(
            f"[gold] {key}: gold {sum(gold) / len(gold):+.3f}, KL {sum(kl) / len(kl):.2f} ({seconds:.0f}s)",
            flush=True,
        )
    return spent


def prepare(spec: dict, work: Path, model: str | None) -> tuple[dict, dict]:
    """Prompts, the starting model's samples, the labelled pairs and the held-out gold pairs (for iopo train's own
    held-out metrics: two samples of each test prompt, the higher gold reward chosen)."""
    from iopo.io.jsonio import write_json, write_jsonl

    prompts = make_prompts(spec)
    (work / "pairs").mkdir(parents=True, exist_ok=True)
    write_json(work / "prompts.json", prompts)
    records = sample_training_answers(spec, work, model, prompts["train"] + prompts["test"])
    test_ids = {p["prompt_id"] for p in prompts["test"]}
    train_records = [r for r in records if r["prompt_id"] not in test_ids]
    pairs = write_pairs(spec, work, train_records)
    test_rows, _ = label_pairs(
        [r for r in records if r["prompt_id"] in test_ids], {"temperature": 1e-9}, seed="test"
    )
    write_jsonl(work / "pairs" / "test.jsonl", test_rows)
    return prompts, pairs


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, "gold.yaml")
    args = parser.parse_args(argv)
    spec, tables, work, results = resolve_spec(parser, args, load_spec)
    try:
        pairs_report = work / "pairs" / "report.json"
        if args.list or args.report_only:
            pairs = json.loads(pairs_report.read_text(encoding="utf-8")) if pairs_report.is_file() else {}
            prompts = None
        else:
            prompts, pairs = prepare(spec, work, args.model)
        runs = train_runs(spec, work, args.model, pairs, tables)
        if args.list:
            for run in runs:
                done, record = run.done(), record_of(results, run)
                scored = len(list((results / "scores" / run.key).glob("step-*.json")))
                state = (
                    f"done {done['seconds']:.0f}s, {scored} checkpoints scored"
                    if done
                    else f"scored earlier, {scored} checkpoints (committed record)"
                    if record
                    else "to run"
                )
                print(f"{run.key:40s} {state}")
            return 0
        if not args.report_only:
            started, spent = time.time(), 0.0
            held: list[Scorer] = []

            def scorer() -> Scorer:  # one starting model in memory for every evaluation of this command
                if not held:
                    held.append(Scorer(spec, prompts["test"], args.model))
                return held[0]

            for run in runs:
                record = record_of(results, run)
                if run.done() is None and record is not None:
                    if record.get("command") is None or same_command(record["command"], run.argv()[3:]):
                        continue  # trained and scored earlier: its committed scores stand
                    if not args.rerun:
                        raise SuiteError(
                            f"{run.key} was scored with other settings than gold.yaml's now "
                            f"({results / 'scores' / run.key / 'run.json'}); pass --rerun to train it again"
                        )
                seconds = execute(run, args.rerun)
                if seconds:
                    forget_scores(results, run)
                spent += seconds + evaluate_runs(spec, work, results, [run], scorer)
                write_record(results, run)
            spent += evaluate_runs(spec, work, results, runs, scorer)
            print(
                f"[gold] done: {spent / 60:.1f} min of work this time, {(time.time() - started) / 60:.1f} min"
            )
        # The results come from every table's runs, not only the tables this command ran: the runs of the others
        # that finished earlier are still evidence (a command for one table must not drop the rest).
        every = train_runs(spec, work, args.model, pairs, list(spec["tables"]))
        write_gold_results(spec, work, results, every, Path(args.docs) if args.docs else None)
    except SuiteError as e:
        print(f"[gold] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
