"""`make demo` / `python -m demo`: the whole pipeline on a built-in toy dataset, on CPU, with a report.

demo/dataset.py draws the data; demo/__main__.py runs the stages through the project's entry points;
demo/report.py writes report.md and its figures.
"""
