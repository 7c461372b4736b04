"""The wire protocol that the ClientApp and the strategies share.

Message types and record keys (:mod:`.protocol`), the round plan both sides follow
(:mod:`.round_plan`), the codecs of what travels (:mod:`.payload` for pruned layers,
:mod:`.stats_payload` for statistics, :mod:`.values_payload` for re-solved values,
:mod:`.secure_encoding` under SecAgg+), and the funnel every reply passes (:mod:`.replies`).
Every codec trusts nothing it reads.
"""
