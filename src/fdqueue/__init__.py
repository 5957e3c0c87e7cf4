"""fdqueue: accept support tickets at once, deliver them to Freshdesk reliably."""

__version__ = "0.1.0"
