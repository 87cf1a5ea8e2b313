"""Errors growlib's command line reports as the user's to fix (one line, exit status 2), not as faults."""


class InputError(ValueError):
    """A value the user gave that cannot work, found while a run or a comparison is set up, before anything
    trains (a budget too small for a schedule, a duplicate seed, data that does not fit the vocabulary)."""
