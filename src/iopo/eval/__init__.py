"""Layer 3, answers and their judgment: generation in process or from a server (generate, vllm_engine) and the
judges (judges/: reward model, OpenAI-compatible LLM, local LM; the cached runner; one model against a baseline)."""
