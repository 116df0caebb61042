"""Layer 4, figures and the Markdown report from run and eval folders (plots, markdown). Reads files only; never
imports torch."""
