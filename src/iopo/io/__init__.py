"""Layer 2, the edges to the world: loading models (models), the SQLite store of generations, judgments, the ledger
and ratings (store), checkpoint folders (checkpoint), run folders and what may be deleted there (runfolder), the
run's logs and records (log, runlog), JSON files (jsonio), OpenAI-compatible servers (openai_client) and the local
llama-server (llama_server)."""
