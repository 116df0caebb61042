"""The settings of generation, judges, `iopo generate`, `iopo eval`, `iopo rate`, `iopo plot` and `iopo report`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from iopo.config.base import Part, expand_shorthands
from iopo.config.train import DataConfig


class GenerationConfig(Part):
    backend: Literal["hf", "openai"] = Field(
        "hf", description="hf: transformers generate in this process; openai: any OpenAI-compatible server."
    )
    temperature: float = Field(
        0.8, ge=0, le=10, description="0 = greedy (paper: 0.8 for Table 1, 0 for Table 2)."
    )
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, gt=0, le=32768)
    n: int = Field(1, gt=0, le=64, description="Answers per prompt.")
    seed: int = Field(0, ge=0, lt=2**32)
    batch_size: int = Field(
        8,
        gt=0,
        description="hf: prompts per batch (left-padded, KV cache; n answers each). A decoding step of 2x the rows "
        "costs ~1.4x here: fill the batch as memory allows.",
    )
    dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model",
        description="hf: the precision generation runs in. model = the precision the model is held in (the "
        "training or evaluation dtype); another value generates from a copy in that precision (bfloat16 on a "
        "CPU with bf16 matmuls: ~1.4x float32's tokens/s measured here, other answers). Part of each answer's key.",
    )
    # backend=openai
    base_url: str | None = Field(None, description="e.g. http://127.0.0.1:8080/v1")
    api_model: str | None = Field(None, description="The server's model name.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (the key is never stored)."
    )
    concurrency: int = Field(4, gt=0, le=256)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)

    @model_validator(mode="after")
    def _dtype(self) -> GenerationConfig:
        if self.dtype != "model" and self.backend != "hf":
            raise ValueError(
                f"dtype={self.dtype} applies to backend=hf; a server generates in its own precision"
            )
        return self


@dataclass(frozen=True)
class JudgeType:
    """The facts of a kind of judge: the code asks these instead of testing a judge's type by name."""

    can: tuple[str, ...]  # the modes it can answer: "pairwise" (A/B in one order) and/or "score"
    default_modes: tuple[str, ...]  # the modes it answers when `modes` is unset
    modes_fixed: bool  # it answers its default modes whatever `modes` says
    score_verdict: Literal[
        "gap", "rubric"
    ]  # its scores: a reward whose gap decides Table 1, or 0-3 for Table 2
    annotates_by: Literal["score", "pairwise"]  # the online rounds' annotate_by=auto
    needs: tuple[tuple[str, str], ...] = ()  # (setting, why) it cannot do without
    holds_model: bool = False  # it runs a model in this process (its `dtype` applies)


JUDGE_TYPES: dict[str, JudgeType] = {
    "reward_model": JudgeType(
        can=("score",),
        default_modes=("score",),
        modes_fixed=True,
        score_verdict="gap",
        annotates_by="score",
        needs=(("model", "a reward_model judge needs model (e.g. the final/ folder of `iopo train-rm`)"),),
        holds_model=True,
    ),
    "openai": JudgeType(
        can=("pairwise", "score"),
        default_modes=("pairwise", "score"),
        modes_fixed=False,
        score_verdict="rubric",
        annotates_by="pairwise",
        needs=(("base_url", "an openai judge needs base_url"),),
    ),
    "local": JudgeType(
        can=("pairwise",),
        default_modes=("pairwise",),
        modes_fixed=False,
        score_verdict="rubric",
        annotates_by="pairwise",
        holds_model=True,
    ),
    "function": JudgeType(
        can=("score",),
        default_modes=("score",),
        modes_fixed=True,
        score_verdict="gap",
        annotates_by="score",
        needs=(("function", "a function judge needs function: 'module:callable' or 'file.py:callable'"),),
    ),
}
JudgeTypeName = Literal[tuple(JUDGE_TYPES)]  # type: ignore[valid-type]


class JudgeConfig(Part):
    type: JudgeTypeName = Field(
        description="reward_model: a sequence-classification reward model; openai: an LLM behind an "
        "OpenAI-compatible server; local: a causal LM in process, from its next-token probabilities of A and B; "
        "function: a Python callable that scores an answer (a rule, a lexicon, a gold reward)."
    )
    function: str | None = Field(
        None,
        description="function: a Python callable f(prompt, answer) -> float that scores an answer, named "
        "'module:callable' or 'path/to/file.py:callable' (its verdict is the score gap, as for a reward model).",
    )
    model: str | None = Field(
        None, description="reward_model/local: hub id or folder (an `iopo train-rm` output for reward_model)."
    )
    modes: list[Literal["pairwise", "score"]] | None = Field(
        None,
        description="pairwise: A/B verdicts in both orders (Table 1); score: a 0-3 rubric per answer (Table 2). "
        "Unset: openai both, local pairwise; reward_model always scores (its score gap gives the verdict).",
    )
    tie_margin: float = Field(
        0.0, ge=0, description="reward_model: |score gap| <= this is a tie; local: |P(A) - 0.5| <= this."
    )
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8080/v1")
    api_model: str | None = Field(
        None,
        description="openai: the model name sent to the server; with it, stored verdicts are reused whatever the "
        "URL (without it, the URL is the judge's identity).",
    )
    api_key_env: str | None = Field(
        None, description="openai: environment variable holding the API key (never logged, never written)."
    )
    concurrency: int = Field(4, gt=0, le=256)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    max_tokens: int = Field(64, gt=0, le=4096, description="openai: reply length limit.")
    json_schema: Literal["object", "enum", "off"] = Field(
        "object",
        description='openai: constrain the reply by a JSON schema - object: {"winner": "A"} (OpenAI\'s '
        'structured outputs need an object); enum: the bare value "A" / 2 (vLLM, llama.cpp: a few tokens '
        "instead of dozens); off: free text. The strict fallback parser reads every form.",
    )
    price_per_1k_prompt_tokens: float = Field(
        0.0, ge=0, description="Money per 1k prompt tokens (paper: ERNIE at 0.0174)."
    )
    price_per_1k_completion_tokens: float = Field(0.0, ge=0)
    batch_size: int = Field(8, gt=0, description="reward_model/local: answers per forward.")
    max_length: int = Field(1024, gt=0, description="reward_model/local: tokens per judged text (left-cut).")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None,
        description="reward_model/local: the precision the judge's model is loaded in; unset = the evaluation's "
        "dtype. Part of the judge's identity (its weights' fingerprint), so its stored verdicts never mix. bf16 "
        "weights score faster on a CPU with bf16 matmuls but not the same: the quickstart's reward model loaded in "
        "bf16 flips 4 of its check's 64 verdicts.",
    )
    check_pairs: int = Field(
        64,
        ge=0,
        description="iopo eval: before judging, the judge judges this many of the split's labelled pairs (chosen "
        "vs rejected; both orders for pairwise); its agreement with the labels and first-position share are stored "
        "beside its verdicts, and a judge whose agreement interval reaches 0.5 is flagged uninformative. 0: no check.",
    )
    position_limit: float = Field(
        0.8,
        gt=0.5,
        le=1,
        description="iopo eval's check: a pairwise judge that picks the first (or the second) answer more often than "
        "this is flagged uninformative.",
    )

    @model_validator(mode="after")
    def _needs(self) -> JudgeConfig:
        facts = self.facts
        for setting, why in facts.needs:
            if not getattr(self, setting):
                raise ValueError(why)
        if self.dtype and not facts.holds_model:
            holders = ", ".join(name for name, kind in JUDGE_TYPES.items() if kind.holds_model)
            raise ValueError(f"dtype applies to a judge that runs a model here ({holders}), not {self.type}")
        odd = [m for m in self.modes or () if m not in facts.can]
        if odd and not facts.modes_fixed:
            raise ValueError(
                f"a {self.type} judge answers {'/'.join(facts.can)} only, not {'/'.join(odd)} "
                f"(modes=[{', '.join(facts.can)}])"
            )
        return self

    @property
    def facts(self) -> JudgeType:
        return JUDGE_TYPES[self.type]

    def effective_modes(self) -> list[str]:
        facts = self.facts
        if self.modes and not facts.modes_fixed:
            return list(dict.fromkeys(self.modes))
        return list(facts.default_modes)


class GenerateConfig(Part):
    """`iopo generate`: answers to a split's prompts, as JSON Lines written as they come."""

    model: str | None = Field(
        None,
        description="A run folder (its final/), a checkpoint, a local folder, a LoRA adapter folder or a hub "
        "id; unset = the embedded SmolLM2-135M-Instruct.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    split: Literal["test", "train", "all"] = "test"
    max_prompts: int | None = Field(None, gt=0, description="The first N distinct prompts of the split.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: str = Field("generations.jsonl", description="JSON Lines file; an existing one is continued.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        return expand_shorthands(values, data="path")


class EvalConfig(Part):
    """`iopo eval`: models against a baseline on a split -> implicit-reward metrics, generations, judgments."""

    models: list[str] = Field(
        default_factory=list,
        description="Models to evaluate (run folders, checkpoints, folders, adapters, hub ids); `label=path` "
        "names one. Positional arguments of `iopo eval` land here.",
    )
    baseline: str | None = Field(
        None,
        description="What each model is compared with and the reference of the implicit reward; unset = the "
        "starting model of the first run given (else the embedded model).",
    )
    data: DataConfig | None = Field(
        None,
        description="The split; unset = the first run's data settings (its test split), else the defaults.",
    )
    split: Literal["test", "train", "all"] = "test"
    max_prompts: int | None = Field(
        None, gt=0, description="Generate and judge the first N distinct prompts (metrics use every pair)."
    )
    beta: float | None = Field(
        None, gt=0, description="β of the implicit reward; unset = the run's loss.beta."
    )
    metrics: bool = Field(True, description="Margin reward and pairwise accuracy vs the baseline.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    judges: dict[str, JudgeConfig] = Field(
        default_factory=dict,
        description="Named judges, e.g. {rm: {type: reward_model, model: runs/rm/final}, "
        "llm: {type: openai, base_url: ...}}.",
    )
    bootstrap: int = Field(
        1000, ge=0, le=100000, description="Bootstrap resamples (over prompts) for the CIs."
    )
    confidence: float = Field(0.95, gt=0, lt=1)
    output_dir: str = Field("evals/eval", description="Eval folder: store.sqlite, generations/, eval.json.")
    batch_size: int = Field(8, gt=0, description="Pairs per forward for the implicit-reward metrics.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the bootstrap.")
    progress_bar: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        values = expand_shorthands(values, data="path")
        if isinstance(values, dict) and isinstance(values.get("models"), str):
            values = {**values, "models": [values["models"]]}  # one model given as a string
        return values


class PlotConfig(Part):
    """`iopo plot`: PNGs from run and eval folders."""

    inputs: list[str] = Field(
        default_factory=list, description="Run and eval folders (positional arguments land here)."
    )
    output_dir: str = Field("plots", description="Where the PNGs go.")


class ReportConfig(Part):
    """`iopo report`: one Markdown file from run and eval folders."""

    inputs: list[str] = Field(
        default_factory=list, description="Run and eval folders (positional arguments land here)."
    )
    output: str = Field("report.md", description="The Markdown file; its PNGs go to a folder beside it.")
    title: str = "iopo report"


class RateConfig(Part):
    """`iopo rate EVAL_DIR`: a local page where people rate an eval's answers blind (0-3 scores and a preference)."""

    eval_dir: str | None = Field(
        None, description="The eval folder (of `iopo eval`) whose answers are rated; the positional argument."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Rate these of the eval's models against its baseline; empty = every model.",
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to bind; the default serves this machine only. 0.0.0.0 shares the page with the "
        "network (anyone who can reach it can rate).",
    )
    port: int = Field(8808, ge=0, le=65535, description="Port; 0 = any free port (printed).")
    overlap: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of the pairs every rater is shown (for inter-rater agreement); each other pair goes "
        "to one rater only.",
    )
    max_pairs: int | None = Field(
        None, gt=0, description="Rate only the first N pairs of the fixed shuffled order."
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed of the pair order, the overlap draw and left/right."
    )
    claim_minutes: float = Field(
        30.0,
        gt=0,
        le=7 * 24 * 60,
        description="A pair shown to a rater is held for them this long before another rater may get it.",
    )
    serve: bool = Field(
        True,
        description="false: do not serve; recompute the human tables into eval.json and write the exports.",
    )
    bootstrap: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples for the CIs.")
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _one_folder(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("eval_dir"), list):
            folders = values["eval_dir"]
            if len(folders) != 1:
                raise ValueError(f"rate one eval folder at a time (got {len(folders)})")
            values = {**values, "eval_dir": folders[0]}
        return values
