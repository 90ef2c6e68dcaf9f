"""Scoring generated images: likeness to a person's photos and adherence to the prompt.

command.py is `lookalike evaluate` (a study's runs, or plain folders); evaluator.py scores images with loaded
models; identity.py, clip_score.py, group.py and scoring.py hold the metrics and their aggregates.
"""
