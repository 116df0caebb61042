"""vLLM in process for the online rounds (`generation.engine=vllm`; GPU users, `pip install "iopo[vllm]"`).

NOT TESTED in this repository: its machines have no GPU and vLLM needs one. It follows the colocated pattern of TRL
and OpenRLHF: the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) next to the trained players, and
after every train stage the policy's weights are pushed into vLLM's model with its `load_weights` (Hugging Face
parameter names, which vLLM's model classes map onto their fused layers). It writes the same records as the Hugging
Face path (`iopo.generate`), keyed the same way, with `engine: vllm` in the settings so the two never mix. vLLM's
sampling is seeded per prompt, but its kernels are not bit-reproducible across batch compositions: a resumed
generation may differ from an uninterrupted one (the HF path's does not).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from iopo.config import ConfigError


class VllmEngine:
    def __init__(
        self, model_path: str, dtype: str, max_model_len: int, gpu_memory_utilization: float, seed: int
    ):
        os.environ.setdefault(
            "VLLM_ENABLE_V1_MULTIPROCESSING", "0"
        )  # the engine here, so weights can be pushed
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(
                "generation.engine=vllm needs vLLM (a CUDA machine): pip install 'iopo[vllm]', or use engine=hf"
            ) from None
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
        )
        self.fingerprint: str | None = None  # of the weights vLLM holds

    def load_weights(self, model, fingerprint: str) -> None:
        """Push a Hugging Face model's weights into vLLM's copy (skipped when it already holds them)."""
        if fingerprint == self.fingerprint:
            return
        weights = list(model.state_dict().items())

        def load(worker) -> None:
            worker.model_runner.model.load_weights(weights=weights)

        try:
            self.llm.collective_rpc(load)
        except (AttributeError, NotImplementedError):  # older vLLM: the driver worker in this process
            self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(weights=weights)
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.fingerprint = fingerprint

    def generate(
        self,
        tokenizer,
        prompts: list[dict],
        gen,
        *,
        meta: dict,
        done: set[str],
        sink: Callable[[list[dict]], None],
        max_prompt_length: int,
    ) -> dict:
        """gen.n answers per prompt entry that `done` lacks, as the HF path's records (iopo.eval.generate.answer_record)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from iopo.data.tokenize import render_prompt
        from iopo.eval.generate import answer_record, record_key

        stop = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
        todo, requests, params = [], [], []
        for index, entry in enumerate(prompts):
            keys = [
                record_key(meta["model_fingerprint"], meta["settings"], entry["prompt_id"], j)
                for j in range(gen.n)
            ]
            if all(k in done for k in keys):
                continue
            text = render_prompt(entry["prompt"], tokenizer)
            ids = tokenizer(text, add_special_tokens=isinstance(entry["prompt"], str))["input_ids"][
                -max_prompt_length:
            ]
            todo.append((entry, ids))
            requests.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    n=gen.n,
                    temperature=gen.temperature,
                    top_p=gen.top_p,
                    max_tokens=gen.max_new_tokens,
                    seed=gen.seed + index,
                    stop_token_ids=stop,
                )
            )
        started, tokens = time.perf_counter(), 0
        if requests:
            outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
            records = []
            for (entry, ids), output in zip(todo, outputs, strict=True):
                for j, completion in enumerate(output.outputs):
                    finish = "length" if completion.finish_reason == "length" else "stop"
                    n_completion = len(completion.token_ids)
                    tokens += n_completion
                    records.append(
                        answer_record(entry, j, completion.text.strip(), finish, len(ids), n_completion, meta)
                    )
            records = [r for r in records if r["key"] not in done]
            sink(records)
            done.update(r["key"] for r in records)
        return {
            "answers": len(requests) * gen.n,
            "completion_tokens": tokens,
            "seconds": time.perf_counter() - started,
        }
