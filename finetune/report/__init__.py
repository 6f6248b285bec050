"""A run's report: history.jsonl (a line per step), run.json (what the run says about itself) and report.html
(one self-contained page), written while it trains and rebuilt from the folder by `finetune report`."""
