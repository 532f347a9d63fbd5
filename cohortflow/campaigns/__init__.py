"""The client side of a campaign: starting one (``launcher``), finding and signalling running
ones (``visibility``), what operators do to them (``controls``), dry runs through the
workflow's own interpreter (``preview``) and the outcome by holdout arm (``report``).

Handlers are referenced by method (``CampaignWorkflow.consent_changed``), never by name.
"""
