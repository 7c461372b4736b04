"""The server's maths, Flower-free: tensors in, tensors out.

l0-norm aggregation and robust rules (:mod:`.aggregation`), adaptive mask expansion
(:mod:`.expansion`), one matrix's merge by a strategy's rule (:mod:`.merging`), the re-solve's
merge (:mod:`.resolve_average`), plausibility bounds on kept values (:mod:`.plausibility`) and
resource-aware layer sampling (:mod:`.sampling`). Nothing here imports Flower or a strategy.
"""
