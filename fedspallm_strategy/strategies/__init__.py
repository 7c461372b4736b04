"""The Flower strategies, one a file, and the registry that picks one by run-config name.

``registry.py`` maps ``strategy`` to a class; ``setup.py`` is what building one takes.
``base.py`` holds what every strategy shares (server-side scoring, replies taken one at a
time, the OWL profile round of ``profile_round.py``); ``one_shot.py`` is the paper's round,
``layerwise.py`` its layer-wise rounds with the masked re-solve, ``exact.py`` (and
``secure_exact.py`` under SecAgg+) the pooled statistics, ``centralized.py`` the upper bound.
After pruning, ``recovery_rounds.py`` fine-tunes the global model on the clients
(``secure_recovery.py`` under SecAgg+); ``secagg_workflow.py`` drives one SecAgg+ round.
"""
