"""The study's analysis: best settings by rule (pareto.py), figures (figures.py), image grids and the HTML
report (build.py)."""
