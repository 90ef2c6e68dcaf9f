"""What the studio's Jobs page reads of a run on every refresh: step records parsed once and then only as the file
grows (compared with workspace.read_metrics, which reads the whole file each time), a log read from its end, and
the loss chart's points."""

from __future__ import annotations

import json

from lookalike.report.figures import smoothed_loss
from lookalike.studio.progress import LOSS_POINTS, StepRecords, log_tail, loss_points
from lookalike.workspace import StepLog, Workspace, read_metrics


def records(steps, **extra) -> str:
    return "".join(json.dumps({"step": step, "loss": step / 10, **extra}) + "\n" for step in steps)


def test_step_records_follow_a_growing_file_a_resumed_runs_rewrite_and_a_line_being_written(tmp_path):
    path, read = tmp_path / "metrics.jsonl", StepRecords()
    assert read(path) == [], "no file yet"
    path.write_text(records(range(1, 4)))
    assert read(path) == read_metrics(path)
    with path.open("a") as file:  # grows, with its last line half written
        file.write(records([4]) + '{"step": 5, "lo')
    assert [r["step"] for r in read(path)] == [1, 2, 3, 4], "a line still being written waits"
    with path.open("a") as file:
        file.write('ss": 0.5}\n')
    assert read(path) == read_metrics(path) and read(path)[-1] == {"step": 5, "loss": 0.5}

    # A resumed run rewrites the file with the steps up to its checkpoint (a new file), then appends: read whole
    # again, even when it has grown past where it was read to, and even when the bytes there look alike.
    StepLog(path, resume_step=2).close()
    with path.open("a") as file:
        file.write(records(range(3, 9), resumed=True))
    assert read(path) == read_metrics(path) and [r["step"] for r in read(path)] == list(range(1, 9))
    assert all(r.get("resumed") for r in read(path)[2:]), "the records after the checkpoint are the new ones"

    path.write_text(records([1]))  # cut shorter in place
    assert read(path) == read_metrics(path)
    path.unlink()
    assert read(path) == []


def test_a_page_reads_a_long_run_in_time_that_does_not_grow_with_it(tmp_path, monkeypatch):
    """Once read, a 100,000-step file is not parsed again: only the lines added since."""
    from lookalike.studio import progress

    path, read = tmp_path / "metrics.jsonl", StepRecords()
    path.write_text(records(range(1, 100_001)))
    assert len(read(path)) == 100_000
    parsed, parse = [], progress.step_records_of
    monkeypatch.setattr(progress, "step_records_of", lambda lines: parsed.append(lines) or parse(lines))
    with path.open("a") as file:
        file.write(records([100_001]))
    assert read(path)[-1]["step"] == 100_001 and len(read(path)) == 100_001
    assert parsed == [[records([100_001]).encode().rstrip(b"\n")]], "only the new line parsed"


def test_the_log_tail_is_its_last_lines_as_the_terminal_showed_them(tmp_path):
    run = Workspace(tmp_path / "ws").run("r")
    run.root.mkdir(parents=True)
    assert log_tail(run) == ""
    lines = [f"line {index}" for index in range(100_000)]  # far longer than the part read
    run.log.write_text("\n".join(lines) + "\ntrain r 1/9\rtrain r 2/9\rtrain r 3/9\n")
    assert log_tail(run, lines=3).splitlines() == ["line 99998", "line 99999", "train r 3/9"]
    assert log_tail(run).splitlines() == lines[-39:] + ["train r 3/9"]
    run.log.write_text("one\ntwo\n")
    assert log_tail(run) == "one\ntwo"


def test_the_loss_chart_is_the_reports_smoothed_curve_thinned_to_its_most_points(tmp_path):
    run = Workspace(tmp_path / "ws").run("r")
    run.root.mkdir(parents=True)
    losses = [(step, ((step * 7919) % 101) / 100) for step in range(1, 2_001)]
    run.metrics.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in losses)
                           + json.dumps({"step": 2_001}) + "\n")  # a record without a loss
    table = loss_points(run)
    smoothed = dict(smoothed_loss(losses))
    assert len(table) <= LOSS_POINTS + 1 and table["step"].iloc[0] == 1 and table["step"].iloc[-1] == 2_000
    for step, value in zip(table["step"], table["loss (smoothed)"]):
        assert value == smoothed[step]
    small = Workspace(tmp_path / "ws").run("small")
    small.root.mkdir()
    small.metrics.write_text(records(range(1, 6)))
    assert list(loss_points(small)["step"]) == [1, 2, 3, 4, 5]
    none = loss_points(Workspace(tmp_path / "ws").run("none"))
    assert none.empty and list(none.dtypes) == ["int64", "float64"], "numbers even before the first step (the chart " \
        "keeps the kind of its first columns)"
