"""Progress lines of long loops: readable in a log file (one line per tenth), done/total and a rate."""
from artdist.progress import Progress, track


def test_a_log_gets_one_line_per_tenth_ending_at_the_total(capsys):
    items = list(range(25))
    seen = list(track(items, Progress(len(items), "batches", "evaluate val"), lambda item: 4))
    assert seen == items
    lines = capsys.readouterr().err.splitlines()  # stderr is not a terminal under pytest
    assert len(lines) == 10 and all(line.startswith("evaluate val: ") for line in lines)
    assert "\r" not in "".join(lines)
    assert lines[-1].startswith("evaluate val: 25/25 batches") and "images/s" in lines[-1] and "eta 0.0 min" in lines[-1]


def test_disabled_progress_prints_nothing_but_still_counts(capsys):
    progress = Progress(3, "shards", enabled=False)
    for _ in range(3):
        progress.update(10)
    assert capsys.readouterr().err == "" and progress.images == 30 and progress.done == 3
