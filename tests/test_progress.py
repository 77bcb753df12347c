from hypothesis import given
from hypothesis import strategies as st

from gclip_cli.progress import SILENT, File, Phase, Progress, Tally

events = st.lists(
    st.one_of(
        st.integers(0, 1000),
        st.builds(Phase, st.sampled_from(["measuring", "writing"]), st.integers(0, 3000)),
        st.builds(File, st.integers(1, 3), st.just(3)),
    )
)


@given(events)
def test_done_never_exceeds_the_total_and_counts_every_byte_of_the_phase(log):
    tally = Tally()
    for event in log:
        tally(event)
        if tally.total is not None:
            assert tally.done <= tally.total
    since_phase = [e for e in log[_last_phase(log) + 1 :] if isinstance(e, int)]
    assert tally.done == sum(since_phase)


def _last_phase(log) -> int:
    return max((i for i, e in enumerate(log) if isinstance(e, Phase)), default=-1)


def test_a_total_found_too_small_is_raised_to_what_was_done():
    tally = Tally()
    for event in (Phase("writing", 10), 6, 6):
        tally(event)
    assert (tally.done, tally.total) == (12, 12)
    tally(Phase("copying", 5))  # a new phase starts from nothing
    assert (tally.done, tally.total) == (0, 5)


def test_the_label_names_the_phase_and_which_of_several_files():
    tally = Tally()
    assert tally.label == "working"  # no phase announced yet
    tally(Phase("measuring", 1))
    assert tally.label == "measuring"
    tally(File(1, 1))
    assert tally.label == "measuring"  # one file: nothing to tell
    tally(File(2, 5))
    assert tally.label == "measuring, file 2 of 5"
    tally(Phase("copying", 1))
    assert tally.label == "copying (no value changes), file 2 of 5"


def test_each_file_tells_the_listener_before_each_file():
    seen = []
    for name in Progress(seen.append).each_file(["a", "b"]):
        seen.append(name)
    assert seen == [File(1, 2), "a", File(2, 2), "b"]


def test_every_event_reaches_the_listener_in_order():
    seen = []
    sink = Progress(seen.append)
    sink.begin("measuring", 5)
    sink.advance(3)
    sink.forward(File(1, 2))
    sink.forward(2)
    assert sink.listening and seen == [Phase("measuring", 5), 3, File(1, 2), 2]


def test_nothing_is_reported_when_nobody_listens():
    assert not SILENT.listening and not Progress().listening
    SILENT.begin("measuring", 5)
    SILENT.advance(5)
    assert list(SILENT.each_file(["a"])) == ["a"]
