"""A signal during TensorFlow work is raised when that work ends, not in the middle of it."""

from __future__ import annotations

import pytest

from kdeploy.util import defer, in_native_section, native_section


def test_signal_inside_native_work_is_raised_when_the_outermost_section_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with native_section():
            with native_section():
                assert in_native_section()
                defer(KeyboardInterrupt())  # what the CLI's handler does when a signal lands here
                done.append("inner finished")
            done.append("outer finished")  # the inner end does not raise: the work is not whole yet
    assert done == ["inner finished", "outer finished"] and not in_native_section()


def test_no_signal_no_exception_and_an_error_inside_still_propagates():
    with native_section():
        pass
    with pytest.raises(ValueError):
        with native_section():
            raise ValueError("converter failed")
    assert not in_native_section()
