"""Pushing an export to the Hugging Face Hub (`push_to_hub=true hub_model_id=org/name`): the repository is created if
it is missing (private unless hub_private=false), then the whole folder (weights, tokenizer, generation config,
model card) is uploaded in one commit through huggingface_hub, which reads HF_TOKEN and HF_ENDPOINT from the
environment as usual. A failed push is one line naming the repository and what to run by hand; the export stays."""

from __future__ import annotations

from pathlib import Path

from iopo.config import ConfigError


def push_folder(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload `folder` to the model repository `repo_id`; returns the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except Exception as e:  # network, authentication, a refused name: the export is kept either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"push of {folder} to the Hub repository {repo_id} failed ({reason}); the export is kept: "
            f"huggingface-cli upload {repo_id} {folder}"
        ) from None
    return str(getattr(commit, "commit_url", commit))
