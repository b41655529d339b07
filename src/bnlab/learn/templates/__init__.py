"""The files ``bnlab learn start NAME`` writes: one per exercise, to be completed."""
