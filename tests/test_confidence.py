"""How sure the report is: bootstrap intervals of a run's means over its images, and the best run's lead over
another bootstrapped over the images both drew alike."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lookalike.report.confidence import confidence, interval, paired_lead


def test_the_interval_of_a_mean_covers_it_and_is_as_wide_as_its_standard_error_says():
    values = list(np.random.default_rng(1).normal(0.3, 1.0, 400))
    low, high = interval(values)
    assert low < np.mean(values) < high and low < 0.3 < high
    assert high - low == pytest.approx(2 * 1.96 * np.std(values) / np.sqrt(400), rel=0.15)
    assert interval(values) == (low, high), "the same report each time it is built"
    assert interval([0.5]) is None and interval([0.2, 0.2, 0.2]) == (0.2, 0.2)


def rows(values: list[float | None], seeds: list[int]) -> list[dict]:
    return [{"prompt": "a photo of sks", "seed": str(seed), "guidance_scale": "5.0", "lora_scale": "",
             "identity_similarity": value, "clip_score": 0.2} for value, seed in zip(values, seeds)]


def test_a_lead_is_measured_over_the_images_drawn_alike_and_judged_against_their_spread():
    generator = np.random.default_rng(2)
    base = list(generator.normal(0.5, 0.1, 30))
    other = rows(base, list(range(30))) + rows([0.9], [99])  # an image the best run did not draw: left out
    random.Random(0).shuffle(other)  # paired by prompt, seed, guidance and strength, not by order
    ahead = rows([v + 0.05 + generator.normal(0, 0.01) for v in base[:29]] + [None], list(range(30)))
    lead, (low, high), pairs = paired_lead(ahead, other, "identity_similarity")
    assert pairs == 29, "the image without a face is left out"
    assert lead == pytest.approx(0.05, abs=0.01) and 0 < low < lead < high
    alike = rows(list(generator.normal(0.5, 0.1, 30)), list(range(30)))
    lead, (low, high), _ = paired_lead(alike, other, "identity_similarity")
    assert low < 0 < high

    assert confidence({"alike": alike}, best="ahead")[1] == [], "a best run without scores: nothing to compare"
    table, lines = confidence({"ahead": ahead, "alike": alike, "other": other}, best="ahead")
    assert [row[:2] for row in table] == [["ahead", "30"], ["alike", "30"], ["other", "31"]]
    assert lines[0].startswith("ahead against alike, identity: +0.0") and lines[0].endswith(
        "over 29 images drawn alike, a lead beyond the images' spread")
    assert lines[1] == ("ahead against alike, CLIP: +0 [+0, +0] over 30 images drawn alike, within the images' "
                        "spread: not a result"), "the same CLIP Score on every image: no lead at all"


def test_an_image_whose_prompt_names_nobody_gives_no_identity_to_the_intervals(tmp_path):
    """As the run's likeness leaves it out (it measures bleed); its CLIP Score still counts."""
    from lookalike.report.confidence import image_scores

    scores = tmp_path / "scores.csv"
    scores.write_text("image,prompt,identity_similarity,clip_score,names_person\n"
                      "a.png,a photo of sks,0.8,0.3,True\nb.png,a photo of a man,0.7,0.2,False\n")
    rows = image_scores(scores)
    assert [(r["identity_similarity"], r["clip_score"]) for r in rows] == [(0.8, 0.3), (None, 0.2)]
