"""A plugin whose import fails: the agent must log it by name and go on."""

raise ImportError("connhex_dummy.broken is broken on purpose")
