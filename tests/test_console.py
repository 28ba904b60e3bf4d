"""What a person reads on a stage's console: a progress line at least every PROGRESS_SECONDS and at the end, its
rate measured from the first step done (start-up does not stretch the time left), and no line between."""

import re

from pipelines.worker import console
from pipelines.worker.console import ProgressLine

LINE = re.compile(r"^train_ldm: step (\d+)/10 \(\d+%\), loss ([\d.]+), ([\d.]+) steps/s, (\S+) left$")


def test_a_progress_line_comes_each_interval_and_at_the_end(monkeypatch, capsys):
    clock = iter([0.0, 100.0, 101.0, 102.0, 140.0, 141.0, 150.0])  # construction, then one reading a step
    monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
    progress = ProgressLine("train_ldm", 10, first=4)
    for step, loss in zip(range(5, 11), (1.0, 3.0, 2.0, 2.0, 4.0, 4.0)):
        progress.update(step, loss)
    lines = [LINE.match(line) for line in capsys.readouterr().out.splitlines()]
    assert all(lines) and [int(m[1]) for m in lines] == [5, 8, 10]
    # Step 5 is the first done: its line counts from construction; later ones from step 5, at 100 s.
    assert [m[2] for m in lines] == ["1.0000", "2.3333", "4.0000"]  # the mean loss since the previous line
    assert [(m[3], m[4]) for m in lines] == [("0.01", "8m20s"), ("0.07", "0m26s"), ("0.10", "0m00s")]


def test_a_progress_line_of_another_unit_and_no_loss(capsys):
    progress = ProgressLine("prepare", 2, unit="file")
    progress.update(1)
    progress.update(2)
    assert re.fullmatch(r"prepare: file 2/2 \(100%\), [\d.]+ files/s, 0m00s left\n", capsys.readouterr().out)
