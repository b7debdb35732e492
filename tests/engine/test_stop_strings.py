"""StopStringMatcher: stop strings across delta boundaries, never emitted."""

from tokenmill.engine.stop_strings import StopStringMatcher


def feed_all(matcher, deltas):
    return [matcher.feed(d) for d in deltas]


def test_no_stop_passes_text_straight_through():
    m = StopStringMatcher(())
    assert feed_all(m, ["Hel", "lo", ""]) == [("Hel", None), ("lo", None), ("", None)]
    assert m.flush() == ""


def test_stop_split_across_three_deltas():
    m = StopStringMatcher(("STOP",))
    assert feed_all(m, ["one S", "T", "O", "Pping"]) == [
        ("one ", None),  # "S" held: it may start "STOP"
        ("", None),
        ("", None),
        ("", "STOP"),
    ]


def test_stop_at_the_very_start():
    assert StopStringMatcher(("###",)).feed("### rest") == ("", "###")
    m = StopStringMatcher(("###",))
    assert feed_all(m, ["#", "#", "#"]) == [("", None), ("", None), ("", "###")]


def test_earliest_stop_wins():
    m = StopStringMatcher(("world", "hello"))
    assert m.feed("say hello world") == ("say ", "hello")
    m = StopStringMatcher(("END", "ne"))
    assert feed_all(m, ["the E", "N", "D of none"]) == [("the ", None), ("", None), ("", "END")]


def test_overlapping_stops_the_first_completed_wins_whatever_the_split():
    stops = ("bcd", "abcdef")
    assert StopStringMatcher(stops).feed("xabcdefg") == ("xa", "bcd")
    assert feed_all(StopStringMatcher(stops), ["xab", "cd"]) == [("x", None), ("a", "bcd")]
    assert StopStringMatcher(("ab", "abc")).feed("abc") == ("", "ab")


def test_held_back_text_is_released_when_it_cannot_match():
    m = StopStringMatcher(("STOP",))
    assert feed_all(m, ["go ST", "ART"]) == [("go ", None), ("START", None)]


def test_held_back_text_is_released_at_flush():
    m = StopStringMatcher(("STOP", "</s>"))
    assert m.feed("the end </") == ("the end ", None)
    assert m.flush() == "</"
    assert m.flush() == ""


def test_only_a_possible_stop_start_is_held():
    m = StopStringMatcher(("abcd",))
    assert m.feed("xxabx") == ("xxabx", None)
    assert m.feed("abc") == ("", None)
    assert m.feed("abcd") == ("abc", "abcd")  # "abcab" + "cd": the held "abc" was not a match
