"""The campaign, cut along its Temporal boundary (docs/architecture.md, "The campaign").

``contract`` names everything clients and activities share with the workflow; ``definition``
is the spec as the workflow runs it; ``messages`` and ``activity_io`` are the dataclasses that
cross the boundary; ``state`` is what one run knows and hands to the next; ``interpreter`` and
``details`` are pure; ``workflow`` is the only module that calls the workflow SDK.

Kept empty on purpose: importing ``workflows.campaign.contract`` from client code must not
import the workflow class.
"""
