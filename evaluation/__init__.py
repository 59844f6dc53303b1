"""Few-shot multiple-choice evaluation (MMLU, C-Eval, CMMLU, GAOKAO-Bench, AGIEval); see evaluate_*.py."""
