import io

from rich.console import Console

from gclip_cli.progress import File, Phase
from gclip_cli.progress_display import ProgressDisplay


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)


def test_the_bar_shows_the_phase_its_percentage_and_never_more_than_the_total():
    """A new phase is drawn as it begins, the last state as the display closes; frames in
    between come at most ten a second, so the test looks at those two only."""
    console = terminal()
    with ProgressDisplay(console, delay=0) as display:
        display(File(2, 3))
        display(Phase("measuring", 1000))
        display(400)
        assert display.shown == (400, 1000)
        display(Phase("writing", 1000))
        for _ in range(4):  # 1600 bytes of 1000: the total follows
            display(400)
            done, total = display.shown
            assert done <= total
    text = console.file.getvalue()
    assert "measuring, file 2 of 3" in text and "working" not in text
    assert "writing, file 2 of 3" in text
    assert "100% 1.6/1.6 kB" in text and "160%" not in text


def test_nothing_is_drawn_before_the_delay():
    console = terminal()
    with ProgressDisplay(console, delay=3600) as display:
        display(Phase("measuring", 10))
        display(10)
    assert console.file.getvalue() == ""


def test_shards_are_counted_by_phase():
    console = terminal()
    with ProgressDisplay(console, unit="shards", delay=0) as display:
        for phase in ("measuring", "writing"):
            for done in range(4):
                display.shards(phase, done, 3)
                assert display.shown == (done, 3) and display.tally.label == phase
    text = console.file.getvalue()
    assert "measuring" in text and "writing" in text and "3/3 shards" in text
