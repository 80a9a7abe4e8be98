"""`kaki chat`: a conversation (session.py), the REPL (shell.py) and its commands (commands.py)."""

from kaki.chat.session import ChatSession, Reply, Settings, Turn

__all__ = ["ChatSession", "Reply", "Settings", "Turn"]
