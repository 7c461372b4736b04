"""Show this project's log lines wherever Flower shows its own (``flwr run --stream``,
``flwr log``, the SuperNode's console)."""

from __future__ import annotations

import logging

PACKAGES = ("llm_pruning", "fedspallm_strategy", "client_app", "server_app")


def share_flower_handlers(level: int = logging.INFO) -> None:
    """Give our package loggers the handlers of Flower's ``flwr`` logger.

    Flower configures only its own logger in the ServerApp/ClientApp processes; our
    modules log under their package names, which would otherwise go nowhere. Where the root
    logger has handlers (a script's ``basicConfig``, pytest), our lines already reach them.
    """
    if logging.getLogger().handlers:
        return
    flower = logging.getLogger("flwr")
    for name in PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        for handler in flower.handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)
