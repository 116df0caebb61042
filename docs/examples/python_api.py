"""The Python API in one script: a config built in code, IOPO and DPO trained on the same pairs, both scored by one
evaluation, the results read as Python objects. Run it from the checkout's root:

    .venv/bin/python docs/examples/python_api.py

It trains on the embedded SmolLM2-135M-Instruct and hh-rlhf (a few minutes on a CPU). IOPO_EXAMPLE_MODEL and
IOPO_EXAMPLE_DATA point it at another model and pair file, and IOPO_EXAMPLE_OUT at another folder (the test suite runs it on a tiny model:
tests/test_docs_commands.py).
"""

import os

import iopo

model = os.environ.get("IOPO_EXAMPLE_MODEL")  # None: the embedded model
data = os.environ.get("IOPO_EXAMPLE_DATA")  # None: the embedded hh-rlhf harmless-base
out = os.environ.get("IOPO_EXAMPLE_OUT", "runs/api")

# 1. Configs are pydantic objects: built in code, validated on the spot (a bad value raises iopo.ConfigError).
common = {
    "model": {"name_or_path": model},
    "data": {
        "path": data,
        "max_length": 128,
        "max_prompt_length": 64,
        "max_train_samples": 16,
        "max_eval_samples": 8,
    },
    "optim": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-5, "warmup_ratio": 0.0},
    "progress_bar": False,
    "tensorboard": False,
}
iopo_cfg = iopo.TrainConfig(method="iopo", output_dir=f"{out}/iopo", iopo={"n_mu": 1, "n_nu": 1}, **common)
dpo_cfg = iopo.TrainConfig(method="dpo", output_dir=f"{out}/dpo", **common)

# 2. Training returns the held-out metrics as a dict (what eval.json holds); the model is exported to final/.
scores = {cfg.method: iopo.train(cfg) for cfg in (iopo_cfg, dpo_cfg)}
for method, result in scores.items():
    print(
        f"{method}: margin reward {result['margin_reward']:.4f}, pairwise accuracy {result['pairwise_accuracy']:.3f}"
    )

# 3. One evaluation of both exports against their starting model (a config built from command-line style
#    overrides, as `iopo eval` would): implicit-reward metrics and answers, no judge here.
eval_cfg = iopo.load_config(
    None,
    [f'models=["{out}/iopo", "{out}/dpo"]', f"output_dir={out}/eval", "max_prompts=2",
     "generation.max_new_tokens=8", "progress_bar=false"],
    iopo.EvalConfig,
)  # fmt: skip
report = iopo.evaluate(eval_cfg)
for label, metrics in report["metrics"].items():
    print(f"eval {label}: pairwise accuracy {metrics['pairwise_accuracy']:.3f} ({metrics['logps_source']})")

# 4. The exported model is a plain Hugging Face folder.
policy = iopo.load_model(iopo.TrainConfig(model={"name_or_path": f"{out}/iopo/final"}).model)
print(type(policy).__name__, sum(p.numel() for p in policy.parameters()), "parameters")
