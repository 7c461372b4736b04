"""A run's state on the server: who sent what (:mod:`.accounting`), the checkpoint a run
resumes from (:mod:`.checkpoint`), and logging shared with Flower's (:mod:`.logs`)."""
