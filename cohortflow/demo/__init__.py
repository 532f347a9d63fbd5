"""``cohortflow demo``: the two shipped example campaigns on the embedded stack."""
