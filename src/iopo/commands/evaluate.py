"""`iopo eval`: one or more models against a baseline on a split, as the paper measures them (Sec. 6, Tables 1-2).

1. implicit-reward metrics of each model vs the baseline as reference: margin reward, pairwise accuracy, and the
   per-pair margins (Fig. 3's distributions);
2. answers to the split's prompts from every model and the baseline (reused when the eval folder has them);
3. judges: pairwise verdicts in both orders (MT-Bench's rule), 0-3 rubric scores, reward-model scores, each asked
   only what the store lacks;
4. Table 1 (win : tie : lose) and Table 2 (win : tie : lose : bad cases, mean score) per judge, with bootstrap CIs
   over prompts; eval.json, a printed table and the cost ledger.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

from iopo.config import JUDGE_TYPES, ConfigError, DataConfig, EvalConfig, dump_config
from iopo.core.formatting import rate, rate_interval
from iopo.core.losses import offline_metrics
from iopo.data.loading import keep_rejects, load_split, pick_split, unique_prompts
from iopo.data.tokenize import tokenize_pairs
from iopo.engine import refcache
from iopo.engine.scoring import model_logps
from iopo.eval.generate import answers_file, generate_answers
from iopo.eval.judges import build_judge
from iopo.eval.judges.check import check_judge, check_line
from iopo.eval.judges.compare import judge_against
from iopo.io import runfolder
from iopo.io.jsonio import write_json
from iopo.io.log import PLAIN, get_logger
from iopo.io.models import load_inference_model, model_fingerprint, resolve_model
from iopo.io.runlog import mark_phase
from iopo.io.store import Store, has_ratings
from iopo.rate.book import RatingBook
from iopo.rate.tables import book_summary, format_human
from iopo.report.card import judged_section, with_judged, write_card

log = get_logger(__name__)


def _unique_labels(sources) -> None:
    seen: dict[str, int] = {}
    for source in sources:
        if source.label in seen:
            seen[source.label] += 1
            source.label = f"{source.label}-{seen[source.label]}"
        else:
            seen[source.label] = 1


def resolve_eval_inputs(cfg: EvalConfig):
    """(models, baseline, data config, beta): unset settings come from the first run folder given."""
    if not cfg.models:
        raise ConfigError("name at least one model to evaluate: iopo eval RUN_OR_MODEL [more ...]")
    models = [resolve_model(spec) for spec in cfg.models]
    run_cfg = next((m.run_config for m in models if m.run_config), None) or {}
    run_model = run_cfg.get("model") if isinstance(run_cfg.get("model"), dict) else {}
    baseline = resolve_model(cfg.baseline or run_model.get("name_or_path") or "embedded")
    if baseline.label in {m.label for m in models}:
        baseline.label = f"{baseline.label} (baseline)"
    _unique_labels(models)
    if cfg.data is not None:
        data = cfg.data
    elif isinstance(run_cfg.get("data"), dict):
        try:
            data = DataConfig.model_validate(run_cfg["data"])
        except ValueError as e:
            raise ConfigError(f"the run's data settings do not validate: {str(e).splitlines()[0]}") from None
    else:
        data = DataConfig()
    loss = run_cfg.get("loss") if isinstance(run_cfg.get("loss"), dict) else {}
    beta = cfg.beta or loss.get("beta") or 0.1
    return models, baseline, data, float(beta)


def _model_metrics(
    model,
    fingerprint: str,
    tokenizer,
    pair_tokens,
    ref_logps,
    beta: float,
    cfg: EvalConfig,
    label: str,
    stores: list[Path],
) -> dict:
    """The model's test log-probs (the baseline: ref_logps None) or its implicit-reward metrics against them.

    The log-probs are read, not computed, when a store holds them for these weights, precision and pairs (this
    eval folder's logps/ from an earlier eval, or the run folder's from its training: refcache.logps_key); computed
    ones are kept in the eval folder (stores[0])."""
    key = refcache.logps_key(fingerprint, cfg.dtype, pair_tokens)  # the weights as loaded (model_fingerprint)
    logps, where = refcache.read_logps(stores, key, len(pair_tokens))
    if logps is not None:
        log.info(f"log-probs of {label} on the {len(pair_tokens)} pairs: reused {where}")
    else:
        progress = f"log-probs {label}" if cfg.progress_bar else None
        logps = model_logps(model, tokenizer, pair_tokens, cfg.batch_size, cfg.dtype != "float32", progress)
        refcache.write_logps(stores[0], key, logps)
    source = str(where) if where is not None else "computed"
    if ref_logps is None:
        return {**logps, "source": source}
    metrics = offline_metrics(
        logps["chosen_logps"],
        logps["rejected_logps"],
        ref_logps["chosen_logps"],
        ref_logps["rejected_logps"],
        beta,
    )
    return {**metrics, "logps_source": source}


def evaluate(cfg: EvalConfig) -> dict:
    """Run the whole evaluation into cfg.output_dir and print its tables; returns what eval.json holds."""
    started = time.time()
    if cfg.generation.backend != "hf":
        raise ConfigError(
            "iopo eval generates in process (generation.backend=hf); for a server use `iopo generate "
            "generation.backend=openai` per model"
        )
    # Every input is checked before the eval folder is made or touched: the models, the judges' models, the data.
    models, baseline, data_cfg, beta = resolve_eval_inputs(cfg)
    for jcfg in cfg.judges.values():
        if jcfg.model:
            resolve_model(jcfg.model)
    train, test, rejects, data_report = load_split(data_cfg)
    out_dir = Path(cfg.output_dir)
    # The eval folder is continued, never cleaned; but config.yaml and eval.json are rewritten, so only an empty
    # folder or one iopo marked as its own is used, by one process at a time.
    with runfolder.hold(out_dir, "iopo eval"):
        runfolder.mark(out_dir)
        resolved = cfg.model_copy(update={"data": data_cfg, "beta": beta})
        (out_dir / "config.yaml").write_text(dump_config(resolved), encoding="utf-8")
        pairs = pick_split(train, test, cfg.split)
        return _evaluate(resolved, models, baseline, pairs, (rejects, data_report), out_dir, started)


def _evaluate(cfg: EvalConfig, models, baseline, pairs, data, out_dir: Path, started: float) -> dict:
    """The evaluation in its held folder; `cfg` is resolved (its data and beta filled in from the first run).
    `data` is (rejects, report) of the data's loading: with data.skip_invalid the rows (and the pairs that do not
    tokenize) set aside go to rejects.jsonl, as in training, and the report into eval.json."""
    rejects, data_report = data
    data_cfg, beta = cfg.data, cfg.beta
    skip_invalid = data_report.pop("skip_invalid", False)
    data_report["rejected"] = len(rejects)
    keep_rejects(rejects, data_report, out_dir)  # the rows set aside, said and written, as in training
    session = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    timings: dict[str, float] = {}
    prompts = unique_prompts(pairs)[: cfg.max_prompts]
    log.info(
        f"eval: {len(models)} model(s) vs {baseline.label} on the {cfg.split} split of {data_report['path']}: "
        f"{len(pairs)} pairs, {len(prompts)} prompts to answer; β={beta:g}; folder {out_dir}"
    )

    results: dict = {
        "baseline": baseline.label,
        "baseline_path": baseline.path,
        "models": {m.label: m.path for m in models},
        "split": cfg.split,
        "data": data_report["path"],
        "n_pairs": len(pairs),
        "n_prompts": len(prompts),
        "beta": beta,
        "data_report": data_report,
        "generation": cfg.generation.model_dump(mode="json"),
        "metrics": {},
        "generations": {},
        "judges": {},
    }
    answers: dict[str, list[dict]] = {}
    # where log-probs may already be: this eval folder, then the run folders the models come from
    stores = [out_dir] + [Path(m.spec) for m in models if m.run_config and Path(m.spec).is_dir()]
    store = Store(out_dir / "store.sqlite")
    try:
        ref_logps, pair_tokens, base_tokenizer = None, None, None
        for source in [baseline, *models]:
            tick = time.perf_counter()
            mark_phase(f"metrics {source.label}")
            model, tokenizer = load_inference_model(source, cfg.dtype, cfg.trust_remote_code)
            fingerprint = model_fingerprint(model)
            if cfg.metrics and pairs:
                if pair_tokens is None:
                    base_tokenizer = tokenizer
                    lengths = {
                        "max_length": data_cfg.max_length,
                        "max_prompt_length": data_cfg.max_prompt_length,
                    }
                    # as training: a pair that does not tokenize stops the eval, or with data.skip_invalid is
                    # set aside into rejects.jsonl (never silently)
                    token_rejects = rejects if skip_invalid else None
                    loaded = len(rejects)
                    pair_tokens, _ = tokenize_pairs(pairs, tokenizer, **lengths, rejects=token_rejects)
                    if len(rejects) > loaded:
                        data_report["rejected"] = len(rejects)
                        keep_rejects(rejects, data_report, out_dir)
                    results["n_pairs_scored"] = len(pair_tokens)
                if source is baseline:
                    ref_logps = _model_metrics(
                        model, fingerprint, tokenizer, pair_tokens, None, beta, cfg, source.label, stores
                    )
                    results["baseline_logps_source"] = ref_logps["source"]
                elif tokenizer.get_vocab() != base_tokenizer.get_vocab():
                    results["metrics"][source.label] = {
                        "skipped": "its tokenizer differs from the baseline's"
                    }
                else:
                    metrics = _model_metrics(
                        model, fingerprint, tokenizer, pair_tokens, ref_logps, beta, cfg, source.label, stores
                    )
                    metrics["fingerprint"] = fingerprint
                    results["metrics"][source.label] = metrics
            timings[f"metrics {source.label}"] = time.perf_counter() - tick
            tick = time.perf_counter()
            mark_phase(f"generate {source.label}")
            records, timing = generate_answers(
                None,
                prompts,
                cfg.generation,
                answers_file(out_dir, source.label),
                max_prompt_length=data_cfg.max_prompt_length,
                loaded=(model, tokenizer, fingerprint, source.label),
                progress=cfg.progress_bar,
            )
            store.put_generations(records)
            answers[source.label] = records
            timing["fingerprint"] = fingerprint
            timing["finish_length_share"] = sum(r["finish_reason"] == "length" for r in records) / max(
                len(records), 1
            )
            results["generations"][source.label] = timing
            timings[f"generate {source.label}"] = time.perf_counter() - tick
            del model
            gc.collect()

        boot = {"n_boot": cfg.bootstrap, "confidence": cfg.confidence, "seed": cfg.seed}
        for name, jcfg in cfg.judges.items():
            tick = time.perf_counter()
            mark_phase(f"judge {name}")
            judge = build_judge(name, jcfg, cfg.dtype, cfg.trust_remote_code)
            try:
                entry = {"type": jcfg.type, "judge_id": judge.judge_id, "modes": judge.modes, "models": {}}
                if jcfg.check_pairs and pairs:  # checked before it speaks
                    checking = time.perf_counter()
                    mark_phase(f"check {name}")
                    entry["check"] = check_judge(
                        judge, store, session, jcfg, pairs, boot=boot, progress=cfg.progress_bar
                    )
                    log.info(check_line(name, entry["check"]))
                    timings[f"check {name}"] = time.perf_counter() - checking
                    mark_phase(f"judge {name}")
                for source in models:
                    entry["models"][source.label] = judge_against(
                        judge,
                        store,
                        session,
                        jcfg,
                        answers[source.label],
                        answers[baseline.label],
                        n=cfg.generation.n,
                        boot=boot,
                        progress=cfg.progress_bar,
                    )
                results["judges"][name] = entry
            finally:
                judge.close()
                gc.collect()
            timings[f"judge {name}"] = time.perf_counter() - tick - timings.get(f"check {name}", 0.0)
        results["ledger"] = {"this_run": store.ledger(session), "all_runs": store.ledger()}
    finally:
        store.close()
    human = _human_tables(out_dir, results, cfg)
    if human:
        results["human"] = human
    results["timings"] = timings
    results["seconds"] = time.time() - started
    write_json(out_dir / "eval.json", results)  # atomic: a kill leaves the old file or the new one
    _update_cards(models, results, out_dir)
    log.info(format_eval(results), extra=PLAIN)
    log.info(f"eval done in {results['seconds']:.0f}s; results in {out_dir / 'eval.json'}")
    return results


def _update_cards(models, results: dict, out_dir: Path) -> None:
    """Each evaluated run's model card (final/README.md, written by iopo) gets this eval's judged section: the
    implicit-reward metrics and every judge's win / tie / lose with intervals. A run folder another process holds
    (still training) is left as it is, and said."""
    for source in models:
        folder = Path(source.path)
        if not (source.run_config and (folder / "README.md").is_file()):
            continue
        run_dir = next((p for p in folder.parents if p.name == "final"), folder).parent
        exported = runfolder.read_marker(run_dir).get("exports", {}).get("final", [])
        if str((folder / "README.md").relative_to(run_dir / "final")) not in exported:
            continue  # not a card iopo wrote
        try:
            with runfolder.hold(run_dir, "iopo eval (its model card)"):
                text = (folder / "README.md").read_text(encoding="utf-8")
                section = judged_section(source.label, results, str(out_dir))
                write_card(folder, with_judged(text, section))
                runfolder.record_export(run_dir, run_dir / "final")
        except ConfigError as e:  # the run folder is in use
            log.info(f"{source.label}: model card left as it is ({e})")
            continue
        log.info(f"{source.label}: its model card ({folder / 'README.md'}) has this eval's judged tables")


def _human_tables(out_dir: Path, results: dict, cfg: EvalConfig) -> dict | None:
    """The folder's human ratings (`iopo rate`), recomputed against this eval's answers and judges."""
    if not has_ratings(out_dir / "store.sqlite"):
        return None
    book = RatingBook(out_dir, results=results)
    try:
        return book_summary(book, cfg.bootstrap, cfg.confidence, cfg.seed)
    finally:
        book.close()


# ---------------------------------------------------------------- printed tables


def format_eval(results: dict) -> str:
    """The eval's tables as text: metrics, Table 1 and Table 2 per judge, the ledger."""
    lines = []
    base = results["baseline"]
    if results.get("metrics"):
        lines.append(f"Implicit reward vs {base} on {results['n_pairs']} pairs (β={results['beta']:g})")
        lines.append(f"{'model':<28} {'margin reward':>14} {'pairwise acc.':>14}")
        for label, m in results["metrics"].items():
            if "skipped" in m:
                lines.append(f"{label:<28} skipped: {m['skipped']}")
                continue
            margin, accuracy = (
                rate(m[k]).strip() if m[k] is None else f"{m[k]:.4f}"
                for k in ("margin_reward", "pairwise_accuracy")
            )
            lines.append(f"{label:<28} {margin:>14} {accuracy:>14}")
    conf = results.get("generation", {})
    for name, judge in results.get("judges", {}).items():
        if judge.get("check"):
            lines += ["", check_line(name, judge["check"])]
        for label, entry in judge["models"].items():
            t1, t2 = entry.get("table1"), entry.get("table2")
            if t1:
                lines.append("")
                how = (
                    "score gap"
                    if JUDGE_TYPES[judge["type"]].score_verdict == "gap"
                    else "both orders, MT-Bench rule"
                )
                lines.append(
                    f"Table 1 - {label} vs {base}, judge '{name}' ({judge['type']}, {how}); "
                    f"{entry['n_prompts']} prompts, 95% CI by bootstrap over prompts"
                )
                lines.append(f"  win   {rate_interval(t1, 'win')}")
                lines.append(f"  tie   {rate_interval(t1, 'tie')}")
                lines.append(f"  lose  {rate_interval(t1, 'lose')}")
                lc = t1.get("length_controlled")
                if lc and lc["n"]:
                    lines.append(
                        f"  length-controlled win rate {rate(lc['win_rate'])} "
                        f"[{rate(lc['ci'][0]).strip()}, {rate(lc['ci'][1]).strip()}] (raw, ties half: "
                        f"{rate(lc['raw']).strip()}; length slope {lc['slope']:+.2f})"
                    )
                extra = f"  judged {t1['n']}, invalid {t1['invalid']}"
                if "order_disagreement" in t1:
                    extra += (
                        f", orders disagree {rate(t1['order_disagreement'])}, "
                        f"first answer preferred {rate(t1['first_position_share'])}"
                    )
                if "mean_reward" in t1:
                    mr = t1["mean_reward"]
                    extra += f", tie margin {t1['tie_margin']:g}, mean reward {mr['model']:.3f} vs {mr['baseline']:.3f}"
                lines.append(extra)
            if t2:
                ms = t2["mean_score"]
                lines.append("")
                lines.append(
                    f"Table 2 - {label} vs {base}, judge '{name}' (0-3 rubric); temperature {conf.get('temperature')}"
                )
                lines.append(
                    f"  win : tie : lose : bad = {rate(t2['win'])} : {rate(t2['tie'])} : {rate(t2['lose'])} : "
                    f"{rate(t2['bad'])}  (judged {t2['n']}, invalid {t2['invalid']})"
                )
                lines.append(f"  mean score {label} {rate(ms['model'])}, {base} {rate(ms['baseline'])}")
    if results.get("human"):
        lines += ["", format_human(results["human"], base)]
    ledger = results.get("ledger")
    if ledger:
        lines.append("")
        lines.append("Judge ledger (money at the configured price per 1k tokens)")
        lines.append(
            f"{'judge':<14} {'':<9} {'requests':>9} {'prompt tok.':>12} {'compl. tok.':>12} {'seconds':>9} {'cost':>10}"
        )
        for judge in sorted(set(ledger["all_runs"]) | set(ledger["this_run"])):
            for when, row in (
                ("this run", ledger["this_run"].get(judge, {})),
                ("all runs", ledger["all_runs"].get(judge, {})),
            ):
                lines.append(
                    f"{judge:<14} {when:<9} {row.get('requests') or 0:>9d} {row.get('prompt_tokens') or 0:>12d} "
                    f"{row.get('completion_tokens') or 0:>12d} {row.get('seconds') or 0:>9.1f} {row.get('cost') or 0:>10.4f}"
                )
    return "\n".join(lines)
