"""`finetune demo`: an application on top of the library, not part of it. It trains each strategy on a shapes-world
concept with the one loop (run.py), judges the results with the shapes evaluator (finetune/shapes/), and writes
demo_report.md (report.py) and demo_report.html (page.py)."""
