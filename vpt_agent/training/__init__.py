"""Supervised fine-tuning of VPT models on VPT_Datasets files (`vpt-agent train`): `data` builds the
training sequences, `trainer` runs transformers' `Trainer` (LoRA or full), `cli` is the subcommand."""
