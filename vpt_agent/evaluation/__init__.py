"""Evaluation of the VPT graph on VPT_Datasets files: `datasets` reads and writes the format,
`metrics` scores answers, `judge` asks an LLM for the paper's 0-1 score, `runner` runs, resumes
and summarizes (`vpt-agent eval`), `distributed` spreads the items over processes and nodes."""
