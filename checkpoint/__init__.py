"""Checkpoints: io.py (tags, the complete.json seal, ``latest``, save and resume, Hugging Face weights in),
safety.py (loading without running code, write guards, recorded file sizes), resume_rules.py (which settings
may change on resume), export.py (a DeepSpeed checkpoint to a Hugging Face folder; scripts/convert_checkpoint.py)
and llama.py (the same weights as a standard Llama folder)."""
