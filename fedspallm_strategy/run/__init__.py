"""A run's state on the server: who sent what (:mod:`.accounting`), the checkpoint a run
resumes from (:mod:`.checkpoint`), the replies kept on disk (:mod:`.reply_store`); and what
every role's process sets up: logging shared with Flower's (:mod:`.logs`) and freed memory
handed back to the system (:mod:`.allocator`)."""
