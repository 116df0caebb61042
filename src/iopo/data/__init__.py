"""Layer 2, preference data: files (reading rows), formats (a row -> a PreferencePair), loading (pairs, the
prompt-grouped split, relabelling, rejects), tokenize (pairs -> token ids, prompts for generation and judges),
collate (token ids -> batches).

The names below are handed on lazily (`from iopo.data import load_split` works without importing torch until a
collate function is asked for)."""

import importlib

_HOMES = {
    "DataError": "files",
    "PreferencePair": "formats",
    "load_rows": "formats",
    "default_data_path": "loading",
    "load_pairs": "loading",
    "load_split": "loading",
    "load_training_data": "loading",
    "relabel_pairs": "loading",
    "split_by_prompt": "loading",
    "unique_prompts": "loading",
    "prompt_id": "loading",
    "write_rejects": "loading",
    "TokenizedPair": "tokenize",
    "tokenize_pairs": "tokenize",
    "render_prompt": "tokenize",
    "answer_ids": "tokenize",
    "prompt_as_text": "tokenize",
    "collate_pairs": "collate",
    "collate_shared": "collate",
    "pad_sequences": "collate",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"iopo.data.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'iopo.data' has no attribute {name!r}")
