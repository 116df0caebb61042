"""The model card of an export: final/README.md in the Hugging Face format (YAML metadata, then Markdown), what
`huggingface-cli upload` would publish beside the weights. The base model, the method and its paper, the settings
that decide the result, the data and its size, and the held-out evaluation with its interval; the whole resolved
config at the end. Pure text from a config and result dicts (no torch); `publish` writes it beside the export and
pushes the folder to the Hub when asked."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from iopo.core.formatting import number, rate_interval
from iopo.core.stats import wilson_interval
from iopo.io import runfolder
from iopo.io.hub import push_folder
from iopo.io.log import get_logger

log = get_logger(__name__)

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default model is, on the Hub
EMBEDDED_LICENSE = "apache-2.0"
EMBEDDED_DATA = "Anthropic/hh-rlhf"  # the embedded data: its harmless-base test split (assets/hh-rlhf)

PAPERS = {
    "iopo": "IOPO, Indirect Online Preference Optimization (Wang et al., IJCAI 2025)",
    "dpo": "DPO (Rafailov et al., NeurIPS 2023)",
    "ipo": "IPO (Azar et al., AISTATS 2024)",
    "hinge": "RSO / SLiC hinge loss (Liu et al., ICLR 2024)",
    "kto_pair": "KTO, pair form (Ethayarajh et al., ICML 2024)",
    "sft": "supervised fine-tuning on the chosen answers",
    "sppo": "SPPO (Wu et al., ICLR 2025)",
    "inpo": "INPO (Zhang et al., ICLR 2025)",
    "spin": "SPIN (Chen et al., ICML 2024)",
    "xpo": "XPO (Xie et al., ICLR 2025)",
    "iter_dpo": "Iterative DPO (Xu et al. 2023; Xiong et al., ICML 2024)",
    "reward_model": "a Bradley-Terry reward model (the IOPO paper's Eq. 2)",
}


def base_license(base: str | None) -> str | None:
    """The base model's license when it can be known offline: the embedded model's, or the `license:` of a local
    base folder's own model card."""
    if not base:
        return EMBEDDED_LICENSE
    card = Path(base) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            try:
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and isinstance(meta.get("license"), str):
                return meta["license"]
    return None


def _dataset_id(path: str | None) -> str | None:
    """A Hub dataset id for the metadata (the embedded data, or a `datasets` name), None for a local file."""
    if not path:
        return EMBEDDED_DATA
    if Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return None
    return path


def model_card(kind: str, config: dict, data_report: dict | None, results: dict | None) -> str:
    """final/README.md. kind: "policy" (iopo train / iopo online) or "reward_model" (iopo train-rm); `config` the
    resolved config as a dict (its dump), `data_report` the data loading's report, `results` the held-out
    evaluation (eval.json's content, or None)."""
    model = config.get("model") or {}
    method = "reward_model" if kind == "reward_model" else config.get("method", "iopo")
    base = model.get("name_or_path")
    meta: dict = {"base_model": base or EMBEDDED_BASE, "library_name": "transformers"}
    license_ = base_license(base)
    if license_:
        meta["license"] = license_
    tags = ["iopo", method.replace("_", "-"), "preference-optimization"]
    if model.get("lora"):
        tags.append("lora")
    meta["tags"] = tags
    dataset = _dataset_id((config.get("data") or {}).get("path"))
    if dataset:
        meta["datasets"] = [dataset]
    meta["pipeline_tag"] = "text-classification" if kind == "reward_model" else "text-generation"

    title = "Reward model" if kind == "reward_model" else f"{method.upper()} policy"
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "---",
        "",
        f"# {title} trained with iopo",
        "",
        f"Trained from `{base or EMBEDDED_BASE}` with {PAPERS.get(method, method)}, by "
        "[iopo](https://pypi.org/project/iopo/)"
        + (
            " (LoRA, merged into the weights)."
            if model.get("lora") and config.get("merge_lora", True)
            else "."
        ),
        "",
    ]
    if kind == "reward_model":
        lines += [
            "Loads with `AutoModelForSequenceClassification.from_pretrained(...)`: one scalar score per text, read at "
            "its last non-padding token; higher is preferred.",
            "",
        ]
    else:
        lines += [
            'Loads with `AutoModelForCausalLM.from_pretrained(...)` or `pipeline("text-generation", ...)`.',
            "",
        ]
    lines += ["## Settings", "", "| setting | value |", "|---|---|"]
    for key, value in _settings(kind, method, config):
        lines.append(f"| `{key}` | {value} |")
    lines += ["", "## Data", ""]
    report = data_report or {}
    source = (
        report.get("path") or (config.get("data") or {}).get("path") or "the embedded hh-rlhf harmless-base"
    )
    lines.append(
        f"- source: `{source}` ({report.get('format', 'auto')} format, {report.get('rows', '?')} rows)"
    )
    for key, what in (
        ("train_pairs", "training pairs"),
        ("test_pairs", "held-out pairs (split by prompt: no prompt on both sides)"),
        ("rejected", "rows set aside as unusable (rejects.jsonl)"),
    ):
        if key in report:
            lines.append(f"- {what}: {report[key]}")
    lines += ["", "## Evaluation", ""]
    lines += _evaluation(kind, results) or ["No held-out evaluation was run."]
    lines += [
        "",
        "## The resolved config",
        "",
        "<details><summary>config.yaml</summary>",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip("\n"),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


def _settings(kind: str, method: str, config: dict) -> list[tuple[str, str]]:
    optim, loss, model = config.get("optim") or {}, config.get("loss") or {}, config.get("model") or {}
    rows = [("method", method)]
    if kind != "reward_model":
        rows.append(("loss.beta", str(loss.get("beta"))))
        if method == "iopo":
            rows.append(("iopo", json.dumps(config.get("iopo"), sort_keys=True)))
        if method in ("inpo", "spin", "xpo"):
            rows.append((method, json.dumps(config.get(method), sort_keys=True)))
    for key in ("learning_rate", "batch_size", "gradient_accumulation_steps", "max_steps", "num_epochs"):
        if optim.get(key) is not None:
            rows.append((f"optim.{key}", str(optim[key])))
    for key in ("rounds", "steps_per_round"):
        if config.get(key) is not None:
            rows.append((key, str(config[key])))
    rows += [
        ("model.lora", str(bool(model.get("lora")))),
        ("mixed_precision", str(config.get("mixed_precision"))),
        ("seed", str(config.get("seed"))),
    ]
    return rows


def _evaluation(kind: str, results: dict | None) -> list[str]:
    if not results:
        return []
    if kind == "reward_model":
        accuracy, n = results.get("pairwise_accuracy"), results.get("n_pairs")
        wilson = wilson_interval(accuracy, n)
        shown = f"{number(accuracy, 4)}" + (f" [{wilson[0]:.3f}, {wilson[1]:.3f}]" if wilson else "")
        return [
            f"Held-out pairwise accuracy (r(chosen) > r(rejected)) on {n} pairs: **{shown}** (95% Wilson interval)."
        ]
    accuracy, n = results.get("pairwise_accuracy"), results.get("n_pairs")
    wilson = wilson_interval(accuracy, n)
    lines = [
        f"Implicit-reward metrics on {n} held-out pairs, against the starting model "
        f"(β = {results.get('beta')}):",
        "",
        "| metric | value |",
        "|---|---|",
        f"| margin reward | {number(results.get('margin_reward'), 4)} (std {number(results.get('margin_reward_std'), 4)}) |",
        f"| pairwise accuracy | {number(accuracy, 4)}"
        + (f" [{wilson[0]:.3f}, {wilson[1]:.3f}] (95% Wilson)" if wilson else "")
        + " |",
    ]
    return lines


JUDGED_START, JUDGED_END = "<!-- iopo eval -->", "<!-- /iopo eval -->"


def judged_section(label: str, results: dict, eval_dir: str) -> str:
    """The card's section for one model from an `iopo eval` (its eval.json content): the implicit-reward metrics
    against the eval's baseline, and each judge's win / tie / lose against it with the 95% bootstrap intervals."""
    lines = [JUDGED_START, f"## Judged (`iopo eval`, {eval_dir})", ""]
    baseline = results.get("baseline")
    metrics = (results.get("metrics") or {}).get(label) or {}
    if "pairwise_accuracy" in metrics:
        lines.append(
            f"Against {baseline} on {metrics.get('n_pairs')} pairs of the {results.get('split')} split: margin reward "
            f"{number(metrics.get('margin_reward'), 4)}, pairwise accuracy {number(metrics.get('pairwise_accuracy'), 4)}."
        )
        lines.append("")
    rows, flagged = [], []
    for name, judge in (results.get("judges") or {}).items():
        entry = (judge.get("models") or {}).get(label) or {}
        table = entry.get("table1")
        check = judge.get("check") or {}
        if check and not check.get("informative", True):
            flagged.append(f"- **{name} is uninformative**: {'; '.join(check.get('reasons', []))}.")
        if table:
            lc = table.get("length_controlled") or {}
            lc_text = number(lc.get("win_rate"), 3) if lc.get("n") else "-"
            agreement = number(check.get("agreement"), 3) if check.get("pairs") else "not checked"
            rows.append(
                f"| {name} ({judge.get('type')}){'' if check.get('informative', True) else ' (uninformative)'} | "
                f"{agreement} | {entry.get('n_prompts')} | {rate_interval(table, 'win')} | "
                f"{rate_interval(table, 'tie')} | {rate_interval(table, 'lose')} | {lc_text} |"
            )
    if rows:
        lines += [
            f"Answers judged against {baseline}'s (95% bootstrap intervals over prompts; agreement: the judge's "
            "agreement with the split's labelled pairs; LC: the length-controlled win rate):",
            "",
            "| judge | agreement | prompts | win | tie | lose | LC win rate |",
            "|---|---|---|---|---|---|---|",
            *rows,
            *([""] + flagged if flagged else []),
        ]
    lines.append(JUDGED_END)
    return "\n".join(lines) + "\n"


def with_judged(card: str, section: str) -> str:
    """The card with its judged section replaced (a later eval) or added before the resolved config."""
    if JUDGED_START in card and JUDGED_END in card:
        head, rest = card.split(JUDGED_START, 1)
        tail = rest.split(JUDGED_END, 1)[1].lstrip("\n")
        return head + section + "\n" + tail
    marker = "## The resolved config"
    if marker in card:
        head, tail = card.split(marker, 1)
        return head + section + "\n" + marker + tail
    return card.rstrip("\n") + "\n\n" + section


def write_card(folder: Path, text: str) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(text, encoding="utf-8")
    return path


def publish(folder: Path, run_dir: Path, card: str, cfg, message: str) -> str | None:
    """The end of an export (iopo train, online, train-rm): its model card written into `folder`, listed with the
    export's files in the run's marker (a fresh start deletes only what iopo wrote), and, with cfg.push_to_hub, the
    folder uploaded to cfg.hub_model_id in a commit named `message`; returns the commit's URL (None: not pushed)."""
    write_card(folder, card)
    runfolder.record_export(run_dir, run_dir / "final")
    if not cfg.push_to_hub:
        return None
    url = push_folder(folder, cfg.hub_model_id, cfg.hub_private, message)
    log.info(f"pushed {folder} to the Hub: {url}")
    return url
